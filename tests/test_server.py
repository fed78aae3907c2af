"""The gRPC server in process, on port 0, with tiny exported models: every rpc, every error
code, sessions, determinism, stop sequences, cancellation, expiry, batching, health and
reflection. The SIGTERM drain runs `nlstm serve` in a subprocess."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.engine import Limits
from serving.formats import image_to_glimpses
from serving.testing.inprocess import ServerThread


@pytest.fixture(scope="module")
def server(models_dir):
    # a message per character (the tiny model makes 300 in well under the default 50 ms
    # interval; no message budget), so that tests can read and cancel a stream mid-way
    s = ServerThread(
        models_dir,
        Limits(
            max_chars=300,
            max_text=2000,
            max_sessions=8,
            max_wait=0.005,
            stream_interval=0.0,
            max_messages_per_s=0.0,
        ),
    )
    yield s
    s.close()


def code_of(fn, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (pb.ScoreResponse, pb.Session)):
            list(result)
    return info.value.code(), info.value.details()


def gen(stub, **kw):
    kw.setdefault("max_chars", 10)
    seed = kw.pop("seed", None)
    req = pb.GenerateRequest(**kw)
    if seed is not None:
        req.seed = seed
    return list(stub.Generate(req))


# ---------------------------------------------------------------------------------- the rpcs
def test_list_models(server):
    models = {m.name: m for m in server.stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {"tiny-char", "tiny-mnist"}
    assert models["tiny-char"].kind == "nlstm" and models["tiny-char"].vocab_size > 10
    assert models["tiny-char"].num_classes == 0 and models["tiny-mnist"].num_classes == 10
    assert models["tiny-char"].metrics["valid_bpc"] == 3.0


def test_score_split_on_a_session_equals_one_call(server):
    stub, text = server.stub, "the cat sat on the mat\na dog ran"
    whole = stub.Score(pb.ScoreRequest(model="tiny-char", text=text, per_char=True))
    assert whole.num_chars == len(text) and len(whole.bits) == len(text)
    assert whole.total_bits == pytest.approx(sum(whole.bits), rel=1e-5)
    assert whole.bits_per_char == pytest.approx(whole.total_bits / len(text))
    s = stub.CreateSession(pb.CreateSessionRequest(model="tiny-char"))
    a = stub.Score(pb.ScoreRequest(session_id=s.session_id, text=text[:11]))
    b = stub.Score(pb.ScoreRequest(session_id=s.session_id, text=text[11:]))
    assert a.total_bits + b.total_bits == pytest.approx(whole.total_bits, rel=1e-5)
    stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id))
    code, _ = code_of(stub.Score, pb.ScoreRequest(session_id=s.session_id, text="x"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_unknown_characters_are_counted(server):
    r = server.stub.Score(pb.ScoreRequest(model="tiny-char", text="the 猫 sat€"))
    assert r.unknown_chars == 2 and r.num_chars == 10


def test_generate_is_deterministic_by_seed_and_continues_a_session(server):
    stub = server.stub
    a = gen(stub, model="tiny-char", prompt="the ", max_chars=20, temperature=1.0, seed=3)
    b = gen(stub, model="tiny-char", prompt="the ", max_chars=20, temperature=1.0, seed=3)
    assert "".join(r.text for r in a) == "".join(r.text for r in b)
    # messages carry one or more characters (more when the reader lags behind generation)
    assert len("".join(r.text for r in a)) == 20 and a[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in a[:-1])
    # greedy: 12 characters in one call equal 6 + 6 on one session
    one = "".join(
        r.text for r in gen(stub, model="tiny-char", prompt="we", max_chars=12, temperature=0)
    )
    s = stub.CreateSession(pb.CreateSessionRequest(model="tiny-char")).session_id
    first = "".join(
        r.text for r in gen(stub, session_id=s, prompt="we", max_chars=6, temperature=0)
    )
    second = "".join(r.text for r in gen(stub, session_id=s, max_chars=6, temperature=0))
    assert first + second == one
    with_bits = gen(stub, model="tiny-char", max_chars=5, temperature=0.5, seed=1, logprobs=True)
    assert all(len(r.bits) == len(r.text) and min(r.bits) > 0 for r in with_bits)
    assert sum(len(r.bits) for r in with_bits) == 5


def test_a_session_keeps_its_own_copy_of_the_state(server):
    """A session's state and logits after a call own their memory: a view of the batch's step
    output would keep the whole (B, S, H) array alive as long as the session."""
    stub = server.stub
    sessions = [
        stub.CreateSession(pb.CreateSessionRequest(model="tiny-char")).session_id for _ in range(3)
    ]
    for sid in sessions:  # concurrent-ish calls share batches
        gen(stub, session_id=sid, prompt="the ", max_chars=30, temperature=1.0, seed=1)
        stub.Score(pb.ScoreRequest(session_id=sid, text="a cat"))
    store = server.running.engine.store
    for sid in sessions:
        held = store._sessions[sid]
        assert held.state.base is None and held.logits.base is None
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


def test_stop_sequences(server):
    stub = server.stub
    free = "".join(
        r.text for r in gen(stub, model="tiny-char", max_chars=60, temperature=1.0, seed=5)
    )
    stop = free[10:12]
    out = gen(stub, model="tiny-char", max_chars=60, temperature=1.0, seed=5, stop=[stop])
    text = "".join(r.text for r in out)
    assert text.endswith(stop) and len(text) <= 12 and free.startswith(text)
    assert out[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE


def test_glimpse_stream_matches_the_model(server, models_dir):
    rng = np.random.default_rng(0)
    image = (rng.random((28, 28)) * 255).astype(np.uint8)
    glimpses = image_to_glimpses(image)
    reqs = [
        pb.GlimpseRequest(model="tiny-mnist" if i == 0 else "", pixels=g.tolist())
        for i, g in enumerate(glimpses)
    ]
    out = list(server.stub.ClassifyGlimpses(iter(reqs)))
    assert [r.step for r in out] == list(range(1, 21))
    assert all(abs(sum(r.probabilities) - 1) < 1e-5 and len(r.probabilities) == 10 for r in out)
    model = server.models["tiny-mnist"]
    want = model.classify(glimpses[None])[0]
    p = np.exp(want - want.max())
    np.testing.assert_allclose(out[-1].probabilities, p / p.sum(), atol=1e-5)
    assert out[-1].predicted_class == int(np.argmax(want))


# ------------------------------------------------------------------------------ error codes
def test_error_codes(server):
    stub = server.stub
    NF, IA, FP = (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    cases = [
        (NF, lambda: gen(stub, model="nope")),
        (NF, lambda: gen(stub, session_id="no-such-session")),
        (IA, lambda: gen(stub, model="tiny-char", temperature=-1)),
        (IA, lambda: gen(stub, model="tiny-char", temperature=math.nan)),
        (IA, lambda: gen(stub, model="tiny-char", temperature=math.inf)),
        (IA, lambda: gen(stub, model="tiny-char", top_p=1.5)),
        (IA, lambda: gen(stub, model="tiny-char", max_chars=0)),
        (IA, lambda: gen(stub, model="tiny-char", max_chars=301)),
        (IA, lambda: gen(stub, model="tiny-char", stop=["a", "b", "c", "d", "e"])),
        (IA, lambda: gen(stub, model="tiny-char", stop=[""])),
        (IA, lambda: gen(stub)),
        (IA, lambda: stub.Score(pb.ScoreRequest(model="tiny-char", text=""))),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            lambda: stub.Score(pb.ScoreRequest(model="tiny-char", text="a" * 2001)),
        ),
        (FP, lambda: gen(stub, model="tiny-mnist")),
        (FP, lambda: stub.Score(pb.ScoreRequest(model="tiny-mnist", text="abc"))),
        (
            FP,
            lambda: list(
                stub.ClassifyGlimpses(
                    iter([pb.GlimpseRequest(model="tiny-char", pixels=[0.0] * 49)])
                )
            ),
        ),
        (
            IA,
            lambda: list(
                stub.ClassifyGlimpses(
                    iter([pb.GlimpseRequest(model="tiny-mnist", pixels=[0.0] * 48)])
                )
            ),
        ),
        (
            IA,
            lambda: list(
                stub.ClassifyGlimpses(
                    iter([pb.GlimpseRequest(model="tiny-mnist", pixels=[math.nan] * 49)])
                )
            ),
        ),
        (NF, lambda: stub.CloseSession(pb.CloseSessionRequest(session_id="gone"))),
        (NF, lambda: stub.CreateSession(pb.CreateSessionRequest(model="nope"))),
    ]
    for want, call in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == want, (want, info.value.details())
        assert info.value.details()  # every error says what was wrong
    # a bad request harms nobody: a good one still works
    assert (
        len("".join(r.text for r in gen(stub, model="tiny-char", max_chars=3, temperature=0))) == 3
    )
    assert (
        server.metric("nlstm_requests_total", {"method": "Generate", "code": "INVALID_ARGUMENT"})
        >= 8
    )


def test_session_bound_and_busy_session(server):
    stub = server.stub
    ids = []
    with pytest.raises(grpc.RpcError) as info:
        for _ in range(20):
            ids.append(stub.CreateSession(pb.CreateSessionRequest(model="tiny-char")).session_id)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        len("".join(r.text for r in gen(stub, model="tiny-char", max_chars=2, temperature=0))) == 2
    )  # others served
    # two calls on one session at once: the second is refused with ABORTED
    sid = ids[0]
    stream = stub.Generate(pb.GenerateRequest(session_id=sid, max_chars=300, temperature=1.0))
    next(stream)
    code, details = code_of(stub.Score, pb.ScoreRequest(session_id=sid, text="abc"))
    assert code == grpc.StatusCode.ABORTED and "in use" in details
    stream.cancel()
    for sid in ids:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


def test_cancelled_stream_frees_its_session(server):
    stub = server.stub
    sid = stub.CreateSession(pb.CreateSessionRequest(model="tiny-char")).session_id
    stream = stub.Generate(pb.GenerateRequest(session_id=sid, max_chars=300, temperature=1.0))
    for _ in range(3):
        next(stream)
    stream.cancel()
    deadline = time.time() + 5
    while True:  # the server notices the cancellation and releases the session
        try:
            r = stub.Score(pb.ScoreRequest(session_id=sid, text="the cat"))
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED and time.time() < deadline
            time.sleep(0.05)
    assert r.num_chars == 7 and math.isfinite(r.total_bits)
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


def test_concurrent_streams_are_batched(server):
    before = server.metric("nlstm_batch_size_sum", {"model": "tiny-char"}) or 0.0
    count0 = server.metric("nlstm_batch_size_count", {"model": "tiny-char"}) or 0.0
    threads = [
        threading.Thread(
            target=gen,
            args=(server.stub,),
            kwargs=dict(model="tiny-char", max_chars=40, temperature=1.0, seed=i),
        )
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = server.metric("nlstm_batch_size_sum", {"model": "tiny-char"}) - before
    calls = server.metric("nlstm_batch_size_count", {"model": "tiny-char"}) - count0
    assert total >= 6 * 40 and total / calls > 1.5  # steps of several streams shared calls
    assert server.metric("nlstm_chars_generated_total", {"model": "tiny-char"}) >= 240


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


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", "nlstm.v1.Inference"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=name)).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    refl = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    resp = next(
        refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in resp.list_services_response.service}
    assert {"nlstm.v1.Inference", "grpc.health.v1.Health"} <= names


def test_serving_never_imports_torch():
    code = (
        "import sys; import serving.server, serving.runtime, serving.client, serving.engine, "
        "serving.http, serving.commands; print(sorted(m for m in sys.modules if m == 'torch' or "
        "m.startswith('training')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sigterm_drains_in_flight_calls(models_dir, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training.cli",
            "serve",
            "--models",
            str(models_dir),
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--grace",
            "5",
            "--host",
            "localhost",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        port = None
        deadline = time.time() + 60
        lines = []
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            m = re.search(r"on port (\d+)", line)
            if m:
                port = int(m.group(1))
        assert port, "".join(lines)
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


# ------------------------------------------------------------------------------ the clients
def _write_idx(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    import gzip
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def test_cli_clients_generate_score_and_classify(server, models_dir, tmp_path, capsys):
    from training.cli import main as cli_main

    target = ["--target", f"localhost:{server.running.port}"]
    assert (
        cli_main(
            [
                "generate",
                *target,
                "--model",
                "tiny-char",
                "--prompt",
                "the ",
                "--max-chars",
                "25",
                "--seed",
                "3",
                "--temperature",
                "0.8",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    again = "".join(
        r.text
        for r in gen(
            server.stub, model="tiny-char", prompt="the ", max_chars=25, seed=3, temperature=0.8
        )
    )
    assert printed == again + "\n" and len(again) == 25  # streamed as it came, the same text
    # the local backend: the same sequence logic on the exported folder, the same text by seed
    for extra in ([], ["--stop", "a", "--top-k", "3"]):
        args = [
            "--model",
            "tiny-char",
            "--prompt",
            "the ",
            "--max-chars",
            "25",
            "--seed",
            "3",
            "--temperature",
            "0.8",
        ]
        assert cli_main(["generate", *target, *args, *extra]) == 0
        served_text = capsys.readouterr().out
        assert (
            cli_main(
                [
                    "generate",
                    "--backend",
                    "onnx",
                    "--models",
                    str(models_dir),
                    "--providers",
                    "cpu",
                    *args,
                    *extra,
                ]
            )
            == 0
        )
        assert capsys.readouterr().out == served_text
    assert (
        served_text.rstrip("\n").endswith("a") and len(served_text) <= 26
    )  # stopped at the stop string
    assert (
        cli_main(["generate", "--backend", "onnx", "--session", "x", "--model", "tiny-char"]) == 2
    )
    assert "--session needs --backend server" in capsys.readouterr().err

    text_file = tmp_path / "text.txt"
    text_file.write_text("the dog sat on the park mat~\n", encoding="utf-8")  # '~' is unknown
    assert cli_main(["score", str(text_file), *target, "--model", "tiny-char", "--per-char"]) == 0
    served = capsys.readouterr().out.splitlines()
    assert (
        cli_main(
            [
                "score",
                str(text_file),
                "--backend",
                "onnx",
                "--models",
                str(models_dir),
                "--model",
                "tiny-char",
                "--per-char",
                "--providers",
                "cpu",
            ]
        )
        == 0
    )
    local = capsys.readouterr().out.splitlines()
    # the same characters scored, the same figures (the step graph either way, float32 logits)
    assert served[0].startswith("29 characters") and served[0].endswith("1 unknown")
    assert len(served) == len(local) == 1 + 29
    r = server.stub.Score(
        pb.ScoreRequest(model="tiny-char", text=text_file.read_text(), per_char=True)
    )
    bpc_local = float(local[0].split(", ")[2].split()[0])
    assert bpc_local == pytest.approx(r.bits_per_char, abs=1e-4)
    for a, b in zip(served[1:], local[1:], strict=True):
        assert a.split("\t")[0] == b.split("\t")[0] and float(a.split("\t")[1]) == pytest.approx(
            float(b.split("\t")[1]), abs=2e-3
        )
    # the local backend's own mistakes: one line, exit status 2
    assert (
        cli_main(
            [
                "score",
                str(text_file),
                "--backend",
                "onnx",
                "--models",
                str(models_dir),
                "--model",
                "tiny-mnist",
            ]
        )
        == 2
    )
    assert "glimpse model" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "score",
                str(text_file),
                "--backend",
                "onnx",
                "--models",
                str(models_dir),
                "--model",
                "nope",
            ]
        )
        == 2
    )
    assert "no exported model 'nope'" in capsys.readouterr().err

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 28, 28))
    _write_idx(tmp_path / "mnist", images, np.array([7, 2, 1]))
    assert (
        cli_main(
            [
                "classify",
                *target,
                "--model",
                "tiny-mnist",
                "--index",
                "1",
                "--data-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert (
        len(lines) == 21 and lines[-1] == "label: 2" and lines[0].startswith("glimpse  1: class ")
    )
    stream = list(
        server.stub.ClassifyGlimpses(
            iter(
                pb.GlimpseRequest(model="tiny-mnist" if i == 0 else "", pixels=g.tolist())
                for i, g in enumerate(image_to_glimpses(images[1].astype(np.uint8)))
            )
        )
    )
    assert lines[19] == (
        f"glimpse 20: class {stream[-1].predicted_class} (p = {max(stream[-1].probabilities):.3f})"
    )
    assert (
        cli_main(
            [
                "classify",
                *target,
                "--model",
                "tiny-mnist",
                "--index",
                "3",
                "--data-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "image index must be in [0, 3)" in capsys.readouterr().err


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
