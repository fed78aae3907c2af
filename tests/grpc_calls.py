"""How the gRPC server tests call the server: `code_of` a call that must fail, `gen` a
Generate read to its end, and `per_char_limits`, the limits of a server that sends a message per
character (tests/test_server.py, tests/test_server_cli.py, tests/test_server_settings.py,
tests/test_hardening.py)."""

from __future__ import annotations

import grpc
import pytest

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.engine import Limits


def per_char_limits() -> Limits:
    """A message per character (the tiny model makes 300 in well under the default 50 ms
    interval; no message budget), so that tests can read and cancel a stream mid-way."""
    return Limits(
        max_chars=300,
        max_text=2000,
        max_sessions=8,
        max_wait=0.005,
        stream_interval=0.0,
        max_messages_per_s=0.0,
    )


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
