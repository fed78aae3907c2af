"""gRPC servers started with settings of their own, on the tiny exported models: idle sessions
expire, the queue depth counts what did not fit in a batch, the stream interval coalesces
messages and the message budget spaces a model's streams (both range-checked), and `nlstm
serve` in a subprocess drains its calls on SIGTERM."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from grpc_calls import code_of, gen
from serve_process import port_in_log, start_serve

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.engine import Limits
from serving.testing.inprocess import ServerThread


def test_idle_sessions_expire(models_dir):
    s = ServerThread(models_dir, Limits(idle_timeout=0.3))
    try:
        sid = s.stub.CreateSession(pb.CreateSessionRequest(model="tiny-char")).session_id
        time.sleep(0.5)
        code, details = code_of(s.stub.Score, pb.ScoreRequest(session_id=sid, text="abc"))
        assert code == grpc.StatusCode.NOT_FOUND and "expired" in details
        # evicted by the call that found it expired: counted, and no longer held
        assert s.metric("nlstm_session_evictions_total") == 1
        assert s.metric("nlstm_active_sessions") == 0
        s.stub.CreateSession(pb.CreateSessionRequest(model="tiny-char"))
        time.sleep(0.5)
        assert s.running.engine.expire_sessions() == 1  # the periodic sweep
        assert s.metric("nlstm_session_evictions_total") == 2
        assert s.metric("nlstm_active_sessions") == 0
        for _ in range(2):
            s.stub.CreateSession(pb.CreateSessionRequest(model="tiny-char"))
        assert s.metric("nlstm_active_sessions") == 2
        time.sleep(0.5)
        s.stub.CreateSession(pb.CreateSessionRequest(model="tiny-char"))  # makes room: drops both
        assert s.metric("nlstm_session_evictions_total") == 4
        assert s.metric("nlstm_active_sessions") == 1
    finally:
        s.close()


def test_queue_depth_counts_ready_sequences_beyond_one_batch(models_dir):
    s = ServerThread(models_dir, Limits(max_batch=2, max_wait=0.005))
    try:
        seen = {"active": 0.0, "waiting": 0.0}
        done = threading.Event()

        def watch():
            while not done.is_set():
                seen["active"] = max(
                    seen["active"], s.metric("nlstm_active_sequences", {"model": "tiny-char"}) or 0
                )
                seen["waiting"] = max(
                    seen["waiting"], s.metric("nlstm_queue_depth", {"model": "tiny-char"}) or 0
                )
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [
            threading.Thread(
                target=gen,
                args=(s.stub,),
                kwargs=dict(model="tiny-char", max_chars=300, seed=i, temperature=1.0),
            )
            for i in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        watcher.join()
        # six streams, batches of two: up to four ready ones wait for each step
        assert 2 < seen["active"] <= 6 and 0 < seen["waiting"] <= 4, seen
        assert s.metric("nlstm_batch_size_bucket", {"model": "tiny-char", "le": "2.0"}) == s.metric(
            "nlstm_batch_size_count", {"model": "tiny-char"}
        )
        deadline = time.time() + 5
        while s.metric("nlstm_active_sequences", {"model": "tiny-char"}) and time.time() < deadline:
            time.sleep(0.01)
        # idle again: nothing active, nothing waiting (the gauges are read at each scrape)
        assert s.metric("nlstm_active_sequences", {"model": "tiny-char"}) == 0
        assert s.metric("nlstm_queue_depth", {"model": "tiny-char"}) == 0
    finally:
        s.close()


def test_sigterm_drains_in_flight_calls(models_dir, tmp_path):
    proc = start_serve(models_dir, "--metrics-port", "-1", "--grace", "5")
    try:
        port = port_in_log(proc)
        channel = grpc.insecure_channel(f"localhost:{port}")
        stub = pb_grpc.InferenceStub(channel)
        stream = stub.Generate(
            pb.GenerateRequest(model="tiny-char", max_chars=300, temperature=1.0)
        )
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the call in flight finishes (all 300, or cut short as CANCELLED)
        last = (rest or [first])[-1]
        assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_CANCELLED)
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(pb.ScoreRequest(model="tiny-char", text="abc"), timeout=5)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert proc.wait(timeout=30) == 0
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stream_interval_coalesces_generate_messages(models_dir):
    """--stream-interval-ms: after the first message, a stream's next waits for the interval and
    carries every character made meanwhile; 0 sends each as it is made. The text is the same."""
    texts, counts = [], []
    for interval in (0.0, 0.05):
        s = ServerThread(
            models_dir, Limits(stream_interval=interval, max_chars=300, max_messages_per_s=0.0)
        )
        try:
            t0 = time.perf_counter()
            msgs = gen(s.stub, model="tiny-char", max_chars=300, seed=5, temperature=1.0)
            elapsed = time.perf_counter() - t0
        finally:
            s.close()
        assert (
            sum(len(m.text) for m in msgs) == 300
            and msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
        )
        texts.append("".join(m.text for m in msgs))
        counts.append(len(msgs))
        if interval:
            # no more messages than intervals elapsed (+ the first and the last)
            assert len(msgs) <= elapsed / interval + 2, (len(msgs), elapsed)
    assert texts[0] == texts[1]
    assert counts[1] < counts[0]


def test_message_budget_spaces_a_models_streams(models_dir):
    """--max-messages-per-s: with a budget of 0.2 messages a second, one stream's messages are
    5 s apart: the first character at once, the other 199 with the last message. Budget 0 (off)
    and --stream-interval-ms 0 send each character as it is made (the reader may take several
    at once when it falls behind: with the CPU build of onnxruntime the tiny model makes its 200
    characters in a few messages' time, so only "more than the budget allows" is certain)."""
    counts = {}
    for budget in (0.2, 0.0):
        s = ServerThread(
            models_dir, Limits(stream_interval=0.0, max_chars=200, max_messages_per_s=budget)
        )
        try:
            msgs = gen(s.stub, model="tiny-char", max_chars=200, seed=5, temperature=1.0)
        finally:
            s.close()
        assert (
            sum(len(m.text) for m in msgs) == 200
            and msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
        )
        counts[budget] = len(msgs)
    assert counts[0.2] <= 2 and counts[0.0] > counts[0.2], counts


def test_stream_interval_and_message_budget_are_checked(models_dir):
    from serving.engine import Engine

    for bad in (-0.001, float("inf"), float("nan"), 11.0):
        with pytest.raises(ValueError, match="stream_interval must be in"):
            Engine({}, Limits(stream_interval=bad))
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_messages_per_s must be a finite number >= 0"):
            Engine({}, Limits(max_messages_per_s=bad))
    from training.cli import main as cli_main

    assert cli_main(["serve", "--models", str(models_dir), "--stream-interval-ms", "inf"]) == 2
    assert cli_main(["serve", "--models", str(models_dir), "--max-messages-per-s", "-5"]) == 2
