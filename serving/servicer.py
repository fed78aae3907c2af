"""The gRPC servicer (thin: each request proto becomes a checked request object of
serving/requests.py, the engine does the work, its answer becomes the response proto) and the
one interceptor that records every call's status and latency, answers requests that do not
parse with INVALID_ARGUMENT, and turns unexpected exceptions into INTERNAL (logged with their
traceback; the client sees no internals)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from google.protobuf.message import DecodeError

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.engine import Engine
from serving.errors import InvalidArgument, ResourceExhausted, ServingError
from serving.limits import Held, InflightBytes, OverBudget
from serving.metrics import Metrics
from serving.requests import GenerateParams, GlimpseParams, ScoreParams

log = logging.getLogger("nlstm.serving")

SERVICE = "nlstm.v1.Inference"
FINISH = {
    "": pb.FINISH_REASON_UNSPECIFIED,
    "LENGTH": pb.FINISH_REASON_LENGTH,
    "STOP_SEQUENCE": pb.FINISH_REASON_STOP_SEQUENCE,
    "CANCELLED": pb.FINISH_REASON_CANCELLED,
}
# An error message travels percent-encoded in the trailers (up to 12 bytes a character), which
# gRPC caps at 8 KiB; past that the client gets RESOURCE_EXHAUSTED from the transport instead of
# the code. A longer message (one that quotes a huge model name or session id) is cut.
MAX_DETAILS = 512


def model_info(name: str, model) -> pb.ModelInfo:
    m = model.meta
    figures = _numbers(m.figures or {})
    q = m.quantization or {}
    return pb.ModelInfo(
        name=name,
        task=m.task,
        kind=m.core,
        vocab_size=(m.vocab_size or 0) if m.kind == "char" else 0,
        num_classes=(m.num_classes or 0) if m.kind == "glimpse" else 0,
        metrics=figures,
        depth=m.depth,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        precision=m.precision,
        reference_metrics=_numbers(q.get("reference_figures", {})),
        quantization=f"{m.precision} {q['settings']['name']} ({q['settings'].get('tool', '')})"
        if q
        else "",
    )


def _numbers(d: dict) -> dict[str, float]:
    return {
        k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def session_info(engine: Engine, s, in_use: bool = False) -> pb.Session:
    return pb.Session(
        session_id=s.session_id,
        model=s.model,
        position=s.position,
        in_use=in_use,
        idle_timeout_seconds=int(engine.limits.idle_timeout),
    )


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(
            models=[model_info(n, self.engine.models[n]) for n in sorted(self.engine.models)]
        )

    async def CreateSession(self, request, context):
        return session_info(self.engine, await self.engine.create_session(request.model))

    async def CloseSession(self, request, context):
        await self.engine.close_session(request.session_id)
        return pb.CloseSessionResponse()

    async def GetSession(self, request, context):
        s = await self.engine.get_session(request.session_id)
        return session_info(self.engine, s, in_use=s.in_use)

    async def SnapshotSession(self, request, context):
        data, s = await self.engine.snapshot_session(request.session_id)
        return pb.SessionSnapshot(data=data, model=s.model, position=s.position)

    async def RestoreSession(self, request, context):
        return session_info(self.engine, await self.engine.restore_session(request.data))

    async def ForkSession(self, request, context):
        return session_info(self.engine, await self.engine.fork_session(request.session_id))

    async def Generate(self, request, context):
        chars = self.engine.generate(GenerateParams.from_pb(request, self.engine.limits))
        async with contextlib.aclosing(chars):  # closing this stream ends the call's sequence now
            async for text, bits, finish, position in chars:
                yield pb.GenerateResponse(
                    text=text, bits=bits, finish_reason=FINISH[finish], position=position
                )

    async def Score(self, request, context):
        r = await self.engine.score(ScoreParams.from_pb(request, self.engine.limits))
        return pb.ScoreResponse(**r)

    async def ClassifyGlimpses(self, request_iterator, context):
        stream = None
        try:
            async for request in request_iterator:
                glimpse = GlimpseParams.from_pb(request)
                if stream is None:
                    stream = await self.engine.glimpse_stream(glimpse)
                else:
                    glimpse.follows(stream.name)
                step, probs, cls, position = await stream.push(glimpse)
                yield pb.GlimpseResponse(
                    step=step, probabilities=probs, predicted_class=cls, position=position
                )
                stream.sent()  # resumed: the answer went out, the session keeps this glimpse
        finally:
            if stream is not None:
                await stream.close()


class Malformed:
    """What a request that does not parse (corrupt bytes, a string field that is not UTF-8)
    deserializes to, so that the call answers INVALID_ARGUMENT: a deserializer that raises makes
    gRPC answer UNKNOWN, and a bidi stream's iterator INTERNAL."""

    def __init__(self, error: DecodeError | UnicodeDecodeError) -> None:
        self.error = error


def _lenient(deserialize, budget: InflightBytes | None = None):
    def parse(data: bytes):
        held = None
        if budget is not None:  # counted from here until the call lets go of the Held
            holding = budget.hold(len(data))
            if isinstance(holding, OverBudget):
                return holding  # refused unparsed
            held = holding
        try:
            request = deserialize(data)
        except (DecodeError, UnicodeDecodeError) as exc:  # the latter from pure-Python protobuf
            return Malformed(exc)
        if held is None:
            return request
        held.request = request
        return held

    return parse


def _parsed(request):
    """The request a deserializer's result stands for (the caller keeps the result itself
    while it uses the request: a Held gives its bytes back when it goes)."""
    if isinstance(request, Held):
        return request.request
    if isinstance(request, Malformed):
        raise InvalidArgument(
            f"malformed request ({request.error}); string fields must be valid UTF-8"
        )
    if isinstance(request, OverBudget):
        raise ResourceExhausted(request.message())
    return request


async def _parsed_stream(requests):
    async for request in requests:
        yield _parsed(request)


def _clip(message: str) -> str:
    if len(message) <= MAX_DETAILS:
        return message
    half = MAX_DETAILS // 2
    return f"{message[:half]} ... {message[-half:]}"


class ErrorsAndMetrics(grpc.aio.ServerInterceptor):
    """Wraps every Inference handler: requests that do not parse -> INVALID_ARGUMENT, domain
    errors -> their status code, cancellations -> CANCELLED, anything else -> INTERNAL (logged);
    counts and times every call."""

    def __init__(self, metrics: Metrics, budget: InflightBytes | None = None) -> None:
        self.metrics = metrics
        self.budget = budget  # bytes of request messages in flight (serving.limits)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE}/"):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        metrics = self.metrics

        def finish(code: str, start: float) -> None:
            metrics.requests.labels(method, code).inc()
            metrics.latency.labels(method).observe(time.perf_counter() - start)

        async def fail(context, exc: BaseException, start: float):
            if isinstance(exc, ServingError):
                finish(exc.code, start)
                await context.abort(getattr(grpc.StatusCode, exc.code), _clip(str(exc)))
            log.error("unexpected error in %s", method, exc_info=exc)
            finish("INTERNAL", start)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log"
            )

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                start = time.perf_counter()
                try:
                    response = await inner(_parsed(request), context)
                except asyncio.CancelledError:
                    finish("CANCELLED", start)
                    raise
                except Exception as exc:
                    if _is_abort(exc):  # an inner interceptor ended the call (serving.auth)
                        finish(_code_name(context), start)
                        raise
                    await fail(context, exc, start)
                finish("OK", start)
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=_lenient(handler.request_deserializer, self.budget),
                response_serializer=handler.response_serializer,
            )

        streaming = handler.unary_stream or handler.stream_stream
        kind = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        parsed = _parsed if handler.unary_stream else _parsed_stream

        async def stream(request, context):
            start = time.perf_counter()
            try:
                async with contextlib.aclosing(streaming(parsed(request), context)) as responses:
                    async for response in responses:
                        yield response
                if handler.stream_stream and context is not None:
                    await _settle()  # a cancellation may be on its way: see _settle
            except (asyncio.CancelledError, GeneratorExit):
                # GeneratorExit: grpc stops iterating a stream cancelled while a response was
                # being sent, and the stream is closed later, at its `yield`
                finish("CANCELLED", start)
                raise
            except Exception as exc:
                if _is_abort(exc):
                    finish(_code_name(context), start)
                    raise
                await fail(context, exc, start)
            finish("OK", start)

        return kind(
            stream,
            request_deserializer=_lenient(handler.request_deserializer, self.budget),
            response_serializer=handler.response_serializer,
        )


# How long a request stream's end waits for a cancellation (see _settle): with no wait, 1 to 2
# of 30 cancelled glimpse streams still ended as OK on a 2-core machine, with 1 ms none did;
# at a load average of 16 on 2 cores 2 ms still missed 1 in 100 (bench/abuse.py j). The
# session is already released when it waits; only the call's status waits.
SETTLE_SECONDS = 0.01


async def _settle() -> None:
    """Let a cancellation that ended the request stream reach this call.

    When a client cancels a request stream (or its process dies), grpc aio completes two
    things: the pending read, with no message, exactly as when the client finishes sending,
    and the call's close, marked cancelled, which cancels the handler's task, but only if the
    task is still running then. Returning at once, the handler would end the call as OK
    (gRPC's ServicerContext.cancelled() does not see a client's cancellation). A short wait
    lets the close arrive when both came together; a stream its client ended well ends
    SETTLE_SECONDS later."""
    await asyncio.sleep(SETTLE_SECONDS)


def _code_name(context) -> str:
    """The status code an abort set on the call's context."""
    code = context.code() if context is not None else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN"


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises this to end the call; it must pass through untouched
    return type(exc).__name__ == "AbortError"
