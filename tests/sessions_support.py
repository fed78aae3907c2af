"""What tests/test_sessions.py and tests/test_sessions_snapshot.py (and test_sessions_redis.py,
which runs their tests against sessions in Redis) share: the limits their servers run with, the
snapshot keys, and small helpers over a gRPC stub. Each test module builds its own servers
(module fixtures) with these."""

from __future__ import annotations

import time

import numpy as np

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.formats import image_to_glimpses
from training.testing.models import CHAR_MODEL

KEY_A, KEY_B = b"a" * 32, b"b" * 32
LIMITS = {
    "max_chars": 4000,
    "max_text": 100_000,
    "max_wait": 0.005,
    "stream_interval": 0.0,
    "max_messages_per_s": 0.0,
}


def sid_of(stub, model=CHAR_MODEL) -> str:
    return stub.CreateSession(pb.CreateSessionRequest(model=model)).session_id


def info(stub, sid) -> pb.Session:
    return stub.GetSession(pb.GetSessionRequest(session_id=sid))


def settled(stub, sid, timeout=10.0) -> pb.Session:
    """GetSession once the call that ran on the session has ended (the server notices a
    cancellation a moment after the client)."""
    deadline = time.time() + timeout
    while (s := info(stub, sid)).in_use:
        assert time.time() < deadline, "the session stayed in use"
        time.sleep(0.01)
    return s


def generate(stub, **kw) -> tuple[str, list]:
    seed = kw.pop("seed", None)
    req = pb.GenerateRequest(**kw)
    if seed is not None:
        req.seed = seed
    msgs = list(stub.Generate(req))
    return "".join(m.text for m in msgs), msgs


def score_bits(stub, sid, text) -> float:
    return stub.Score(pb.ScoreRequest(session_id=sid, text=text)).total_bits


def glimpse_requests(glimpses, model="", session_id=""):
    for i, g in enumerate(glimpses):
        first = i == 0
        yield pb.GlimpseRequest(
            model=model if first else "", session_id=session_id if first else "", pixels=g.tolist()
        )


def random_glimpses(seed: int, n: int) -> np.ndarray:
    image = (np.random.default_rng(seed).random((28, 28)) * 255).astype(np.uint8)
    return image_to_glimpses(image)[:n]
