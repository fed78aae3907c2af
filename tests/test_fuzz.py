"""The server under a property-based fuzzer (hypothesis, serving/testing/fuzz.py): random and
malformed requests to every rpc, sent as raw bytes. Each must get a status code that docs/serving.md
documents for it (never INTERNAL, never UNKNOWN), and after each batch the server must still
answer known-good requests as it did at the start. bench/fuzz.py runs thousands of them against
a real `nlstm serve` process.

Then plain regression tests for what the fuzzer found."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.engine import Limits
from serving.servicer import MAX_DETAILS, SERVICE
from serving.testing.fuzz import RPCS, SLOW_EXAMPLES, Fuzzer
from serving.testing.inprocess import ServerThread
from training.testing.models import CHAR_MODEL, GLIMPSE_MODEL, export_tiny_models

LIMITS = Limits(
    max_chars=64, max_text=512, max_sessions=16
)  # small, so that random sizes reach them
BATCHES = 100  # hypothesis examples per rpc, each a batch of 1 to 4 requests
SURROGATE = "\ud800".encode("utf-8", "surrogatepass")  # a lone surrogate: not UTF-8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerThread(export_tiny_models(tmp_path_factory.mktemp("exported")), LIMITS)
    yield s
    s.close()


@pytest.fixture(scope="module")
def fuzzer(server) -> Fuzzer:
    return Fuzzer(server.channel, LIMITS)


def internal_errors(server) -> float:
    return sum(
        server.metric("nlstm_requests_total", {"method": rpc, "code": "INTERNAL"}) or 0
        for rpc in RPCS
    )


@pytest.mark.parametrize("rpc", RPCS)
@settings(
    max_examples=BATCHES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=SLOW_EXAMPLES,
)
@given(data=st.data())
def test_fuzz(server, fuzzer, rpc, data):
    for request in data.draw(
        st.lists(fuzzer.requests(rpc), min_size=1, max_size=4), label="requests"
    ):
        outcome = fuzzer.send(rpc, request)
        assert outcome.problem is None, outcome.problem
    assert fuzzer.still_good() is None
    assert internal_errors(server) == 0


# ------------------------------------------------------------------- what the fuzzer found
def raw_call(server, rpc: str, data: bytes | list[bytes]):
    """(code, details, responses before the end) of `rpc` called with raw bytes (a list of
    them: a stream)."""
    path = f"/{SERVICE}/{rpc}"
    out: list[bytes] = []
    try:
        if isinstance(data, list):
            out.extend(server.channel.stream_stream(path)(iter(data), timeout=10))
        elif rpc == "Generate":
            out.extend(server.channel.unary_stream(path)(data, timeout=10))
        else:
            out.append(server.channel.unary_unary(path)(data, timeout=10))
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), out
    return grpc.StatusCode.OK, "", out


def test_requests_that_do_not_parse_are_invalid_argument(server):
    # were UNKNOWN ("Unexpected <class 'DecodeError'>") for unary calls and INTERNAL for glimpses
    corrupt = b"\xff\xff\xff"  # a field number whose varint never ends
    glimpse = pb.GlimpseRequest(model=GLIMPSE_MODEL, pixels=[0.5] * 49).SerializeToString()
    cases = [(rpc, corrupt) for rpc in RPCS if rpc != "ClassifyGlimpses"] + [
        ("ClassifyGlimpses", [corrupt]),
        # a good request, then its first string field again (the last one wins), not UTF-8
        ("CreateSession", b"\x0a\x03" + SURROGATE),
        ("CloseSession", b"\x0a\x03" + SURROGATE),
        (
            "Score",
            pb.ScoreRequest(model=CHAR_MODEL, text="abc").SerializeToString()
            + b"\x0a\x03"
            + SURROGATE,
        ),
        (
            "Generate",
            pb.GenerateRequest(model=CHAR_MODEL, max_chars=3).SerializeToString()
            + b"\x0a\x03"
            + SURROGATE,
        ),
        ("ClassifyGlimpses", [glimpse, b"\x0a\x03" + SURROGATE]),  # the first glimpse is answered
    ]
    before = (
        server.metric("nlstm_requests_total", {"method": "Score", "code": "INVALID_ARGUMENT"}) or 0
    )
    for rpc, data in cases:
        code, details, out = raw_call(server, rpc, data)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (rpc, data, code, details)
        assert "malformed request" in details and "UTF-8" in details
        assert len(out) == (len(data) - 1 if isinstance(data, list) else 0)
    assert internal_errors(server) == 0
    assert (
        server.metric("nlstm_requests_total", {"method": "Score", "code": "INVALID_ARGUMENT"})
        == before + 2
    )
    assert server.stub.Score(pb.ScoreRequest(model=CHAR_MODEL, text="abc")).num_chars == 3


@pytest.mark.parametrize("name", ["x" * 10_000, "\U0001f600" * 3000])
def test_huge_names_keep_their_error_code(server, name):
    # the error message quoted the whole name: past gRPC's 8 KiB of trailers the client got
    # RESOURCE_EXHAUSTED from the transport instead of NOT_FOUND (a name of 100,000 characters
    # no longer reaches the servicer: the receive limit, sized from max_text, refuses it)
    for call in (
        lambda: server.stub.CreateSession(pb.CreateSessionRequest(model=name)),
        lambda: server.stub.Score(pb.ScoreRequest(session_id=name, text="abc")),
        lambda: list(server.stub.Generate(pb.GenerateRequest(model=name, max_chars=3))),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()[:200]
        details = info.value.details()
        assert len(details) <= MAX_DETAILS + 5 and " ... " in details
    assert len(server.stub.ListModels(pb.ListModelsRequest()).models) == 2
    with pytest.raises(grpc.RpcError) as info:
        server.stub.CreateSession(pb.CreateSessionRequest(model="x" * 100_000))
    assert (
        info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "larger than max" in info.value.details()
    )


def test_a_restored_position_leaves_room_to_grow(server):
    # a forged snapshot at position 2**64 - 1 was restored, and every call on the session then
    # failed with INTERNAL (its next position did not fit the proto's uint64), GetSession too
    from serving import snapshot

    sid = server.stub.CreateSession(pb.CreateSessionRequest(model=CHAR_MODEL)).session_id
    server.stub.Score(pb.ScoreRequest(session_id=sid, text="the cat"))
    s = snapshot.decode(server.stub.SnapshotSession(pb.SnapshotSessionRequest(session_id=sid)).data)
    server.stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    for position in (2**64 - 1, 2**63):
        s.position = position
        code, details, _ = raw_call(
            server,
            "RestoreSession",
            pb.RestoreSessionRequest(data=snapshot.encode(s)).SerializeToString(),
        )
        assert (
            code == grpc.StatusCode.INVALID_ARGUMENT
            and "the largest a restored session may start at" in details
        )
    s.position = 2**63 - 1  # the largest accepted: calls on it work
    restored = server.stub.RestoreSession(
        pb.RestoreSessionRequest(data=snapshot.encode(s))
    ).session_id
    assert server.stub.Score(pb.ScoreRequest(session_id=restored, text="a")).position == 2**63
    server.stub.CloseSession(pb.CloseSessionRequest(session_id=restored))
    assert internal_errors(server) == 0
