"""The gRPC server in process, on port 0, with tiny exported models: every rpc, every error
code, sessions, determinism, stop sequences, cancellation, batching, health and reflection.
Servers with settings of their own (expiry, queue depth, message interval and budget, the
SIGTERM drain) are tests/test_server_settings.py; the client commands, tests/test_server_cli.py."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_calls import code_of, gen, per_char_limits

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.formats import image_to_glimpses
from serving.testing.inprocess import ServerThread


@pytest.fixture(scope="module")
def server(models_dir):
    s = ServerThread(models_dir, per_char_limits())
    yield s
    s.close()


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
