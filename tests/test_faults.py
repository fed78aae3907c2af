"""Regressions for the bugs bench/faults.py found: a stream the client cancels while a response
is being sent must count as CANCELLED (and end its sequence at once), and on shutdown a
Generate still running near the end of the grace period must end with FINISH_REASON_CANCELLED
instead of being cut off with UNAVAILABLE. No torch: a slow stand-in model."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc
import numpy as np

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.formats import Tokenizer
from serving.metrics import Metrics
from serving.server import build_server, shutdown
from serving.servicer import ErrorsAndMetrics
from training.data.tokenizer import train_char_tokenizer


class SlowCharModel:
    """A character model whose step takes 5 ms (uniform predictions), so a Generate of a few
    thousand characters outlasts a short grace period."""

    def __init__(self) -> None:
        self.tokenizer = Tokenizer(
            train_char_tokenizer(["the cat sat on the mat"], newline=True).model_proto
        )
        self.meta = SimpleNamespace(kind="char", state_slots=["layer0.h"])

    def initial_state(self, batch_size: int) -> np.ndarray:
        return np.zeros((batch_size, 1, 4), np.float32)

    def step(
        self, inputs: np.ndarray, state: np.ndarray, *, check: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        time.sleep(0.005)
        return np.zeros((len(inputs), self.tokenizer.vocab_size), np.float32), state


def test_a_stream_closed_at_its_yield_counts_as_cancelled():
    # grpc stops iterating a stream whose call is cancelled while a response is being sent,
    # and closes it later at its `yield`: that must count as CANCELLED and close the
    # servicer's stream (the engine's sequence and session) right then
    metrics, closed = Metrics(), []

    async def responses(request, context):
        try:
            while True:
                yield pb.GenerateResponse(text="a")
        finally:
            closed.append(True)

    async def continuation(details):
        return grpc.unary_stream_rpc_method_handler(responses)

    async def main():
        details = SimpleNamespace(method="/nlstm.v1.Inference/Generate")
        handler = await ErrorsAndMetrics(metrics).intercept_service(continuation, details)
        stream = handler.unary_stream(pb.GenerateRequest(), None)
        assert (await stream.__anext__()).text == "a"
        await stream.aclose()
        assert closed == [True]

    asyncio.run(main())
    assert (
        metrics.registry.get_sample_value(
            "nlstm_requests_total", {"method": "Generate", "code": "CANCELLED"}
        )
        == 1
    )


def test_shutdown_ends_a_running_generate_with_finish_reason_cancelled():
    grace = 1.0

    async def main():
        running = await build_server({"slow": SlowCharModel()}, port=0, host="localhost")
        async with grpc.aio.insecure_channel(f"localhost:{running.port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            sid = (await stub.CreateSession(pb.CreateSessionRequest(model="slow"))).session_id
            call = stub.Generate(
                pb.GenerateRequest(session_id=sid, max_chars=4000, temperature=1.0)
            )
            responses = [await call.read()]
            t0 = time.perf_counter()
            stopping = asyncio.create_task(shutdown(running, grace))
            while (r := await call.read()) is not grpc.aio.EOF:
                responses.append(r)
            ended = time.perf_counter() - t0
            assert await call.code() == grpc.StatusCode.OK
            await stopping
        return responses, ended

    responses, ended = asyncio.run(main())
    assert responses[-1].finish_reason == pb.FINISH_REASON_CANCELLED
    assert 0 < sum(len(r.text) for r in responses) < 4000
    assert ended < grace
