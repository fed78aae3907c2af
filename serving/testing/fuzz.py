"""Property-based fuzzing of the gRPC server (hypothesis): a request strategy for every rpc, with
mostly-invalid fields mixed with valid ones, and a checker that knows from docs/serving.md which
status codes each request may get. Needs hypothesis (the dev extra).

tests/test_fuzz.py runs a bounded number of examples against an in-process server and
bench/fuzz.py thousands against a real `nlstm serve` process; both send each request with
`Fuzzer.send` and then ask `Fuzzer.still_good` whether a known-good request still gets the
answer it got at the start.

Requests are encoded field by field here, not by the protobuf library: that is the only way to
send what a Python client cannot put in a message (a string that is not UTF-8, such as a lone
surrogate; a varint beyond the field's range; a float given by its raw bits, NaN payloads
included; a field with the wrong wire type; a cut or padded message). The checker parses the
bytes with the protobuf library the server uses, to know what the server saw: bytes that do not
parse must get INVALID_ARGUMENT, the rest the codes their fields call for. The fuzzer sends one
request at a time, so ABORTED (two calls on one session) and UNAVAILABLE (a draining server)
are never right.

RestoreSession gets real snapshots of the server's models (made once, at the start), mutated:
bits flipped, bytes cut, spliced in or appended, or the snapshot decoded, a field changed (the
model, its export identity, the position up to 2**64 - 1, the state's shape, NaN in the state)
and encoded again with a valid checksum; and random bytes of every size up to past the receive
limit. The checker reads what the server saw with serving/snapshot.py's decoder and the
identities the real snapshots carry, so it knows which of INVALID_ARGUMENT, FAILED_PRECONDITION
and OK each must get.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from serving import snapshot
from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.limits import Limits, request_bytes_needed
from serving.servicer import SERVICE

METHODS = pb.DESCRIPTOR.services_by_name["Inference"].methods_by_name
RPCS = (
    "ListModels",
    "CreateSession",
    "CloseSession",
    "Generate",
    "Score",
    "ClassifyGlimpses",
    "GetSession",
    "SnapshotSession",
    "RestoreSession",
    "ForkSession",
)
SESSION_RPCS = ("GetSession", "SnapshotSession", "ForkSession")  # a session id, and nothing else
OK, IA, NF, FP, RE = (
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
)
# what valid texts are made of; other characters are the unknown symbol (counted, still valid)
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"
GOOD_TEXT = "the cat sat on the mat\n"  # the known-good Score request
GOOD_GLIMPSES = 3  # glimpses in the known-good ClassifyGlimpses request
HUGE_IDS = (10_000, 100_000)  # characters of a huge model name or session id
# a few valid glimpses: most valid glimpse messages draw one of these (cheaper than 49 draws)
GLIMPSES = tuple(
    tuple(float(v) for v in row)
    for row in np.random.default_rng(0).random((8, 49), dtype=np.float32)
) + (
    (0.0,) * 49,
    (1.0,) * 49,
)


# ------------------------------------------------------------------------------ wire format
@dataclass(frozen=True)
class SessionRef:
    """A session id chosen when the request is sent: "live" a session created for it on a model
    of the rpc's kind, "other" one on a model of the other kind, "stale" a closed one, "near"
    a live session's id with its last character changed."""

    kind: str


@dataclass(frozen=True)
class SnapshotRef:
    """Snapshot bytes chosen when the request is sent: the real snapshot of a model of `kind`
    ("char", "glimpse"), changed by `mutation` (see `mutate`)."""

    kind: str
    mutation: tuple = ()


def mutate(data: bytes, mutation: tuple) -> bytes:
    """`data` changed by `mutation`: ("flip", i, bit), ("cut", n: bytes off the end), ("head", n:
    the first n bytes), ("splice", i, bytes), ("pad", bytes), ("zeros", n), or ("field", name,
    value): decoded, the field set, encoded again (unsigned, a valid checksum); () leaves it as
    it is."""
    if not mutation:
        return data
    op, *args = mutation
    if op == "flip":
        i = args[0] % len(data)
        return data[:i] + bytes([data[i] ^ (1 << args[1])]) + data[i + 1 :]
    if op == "cut":
        return data[: max(0, len(data) - args[0])]
    if op == "head":
        return data[: args[0]]
    if op == "splice":
        i = args[0] % (len(data) + 1)
        return data[:i] + args[1] + data[i:]
    if op == "pad":
        return data + args[0]
    if op == "zeros":
        return data + b"\0" * args[0]
    s = snapshot.decode(data)
    name, value = args
    if name == "state_columns":  # a state of another shape
        s.state = np.resize(s.state, (s.state.shape[0], value))
    elif name == "nan":
        s.state = s.state.copy()
        s.state.flat[value % s.state.size] = np.nan
    elif name == "logits":
        s.logits = None if value is None else np.full(value, 0.5, np.float32)
    else:
        setattr(s, name, value)
    return snapshot.encode(s)


@dataclass(frozen=True)
class Fields:
    """One request message as the fuzzer sends it: (field, value) pairs in wire order (a name of
    the message's field, or the number of a field it does not have), then `cut` bytes removed
    from the end of the encoding and `tail` appended."""

    items: tuple[tuple[str | int, Any], ...] = ()
    cut: int = 0
    tail: bytes = b""


Message = Fields | bytes  # bytes: sent as they are
Request = Message | tuple  # ClassifyGlimpses: a tuple of messages, the stream


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative number as protobuf writes an int64: ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
    """A float32's four bytes; an int is taken as its raw bits."""
    if isinstance(value, int):
        return struct.pack("<I", value % (1 << 32))
    return struct.pack("<f", value)


def _field(number: int, ftype: int | None, value) -> bytes:
    """One field by the type of its value: str (UTF-8, lone surrogates passed through, so not
    UTF-8) and bytes length-delimited, bool and int a varint (an int in a float field: its raw
    bits), float fixed32, a list packed floats or repeated strings."""
    if isinstance(value, (list, tuple)):
        if ftype == FieldDescriptor.TYPE_FLOAT:
            return _delimited(number, b"".join(_float32(v) for v in value))
        return b"".join(_field(number, ftype, v) for v in value)
    if isinstance(value, bytes):
        return _delimited(number, value)
    if isinstance(value, str):
        return _delimited(number, value.encode("utf-8", "surrogatepass"))
    if ftype == FieldDescriptor.TYPE_FLOAT or isinstance(value, float):
        return _varint(number << 3 | 5) + _float32(value)
    return _varint(number << 3) + _varint(int(value))


def encode(
    message: Message, descriptor, resolve: Callable[[SessionRef | SnapshotRef], str | bytes]
) -> bytes:
    """The bytes of one message of type `descriptor`, each SessionRef or SnapshotRef replaced by
    resolve(ref)."""
    if isinstance(message, bytes):
        return message
    out = b""
    for name, value in message.items:
        f = descriptor.fields_by_name[name] if isinstance(name, str) else None
        if isinstance(value, (SessionRef, SnapshotRef)):
            value = resolve(value)
        out += _field(f.number if f else name, f.type if f else None, value)
    return out[: max(0, len(out) - message.cut)] + message.tail


def parse(cls, data: bytes):
    """What the server sees in `data`: a message, or None when it does not parse."""
    try:
        return cls.FromString(data)
    except DecodeError:
        return None


# ------------------------------------------------------------------------------- strategies
F32 = st.floats(width=32)  # any float32: NaN, infinities, subnormals, the largest
ODD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, -1.0, 1e-45, 3.4e38, -3.4e38])
RAW_BITS = st.integers(0, (1 << 32) - 1)  # a float by its bits: NaN payloads, signalling NaNs
ANY_INT = st.integers(-(1 << 63), (1 << 64) - 1)  # beyond uint32 protobuf keeps the low bits
# every example is a round trip to a server, some are large: hypothesis's speed and size checks
# do not apply
SLOW_EXAMPLES = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]


def _texts(min_size: int, max_size: int) -> st.SearchStrategy:
    return st.text(alphabet=ALPHABET, min_size=min_size, max_size=max_size)


def _junk(huge: tuple[int, ...]) -> st.SearchStrategy:
    """What may come in any string field: empty, random Unicode, lone surrogates (not UTF-8 on
    the wire), random bytes, an int (the wrong wire type), or `huge` characters."""
    return st.one_of(
        st.just(""),
        st.text(max_size=30),
        st.text(st.characters(categories=["Cs"]) | st.characters(), min_size=1, max_size=12),
        st.binary(min_size=1, max_size=30),
        ANY_INT,
        st.sampled_from(huge).map(lambda n: "x" * n),
    )


def _unknown_field() -> st.SearchStrategy:
    """A field the message does not have (0 is no field number at all: it does not parse), or
    one of its own numbers with a value of another wire type."""
    number = st.integers(1, 12) | st.integers(0, (1 << 29) - 1)
    return st.tuples(number, st.one_of(ANY_INT, st.binary(max_size=8), F32))


# A rare branch is taken when a draw of st.integers(0, n - 1) gives a value in the middle: in
# complex examples hypothesis favours the simplest choice, 0, and shuns the largest.
def _one_in(draw, n: int) -> bool:
    return draw(st.integers(0, n - 1)) == n // 2


@st.composite
def _mostly(draw, messages: st.SearchStrategy):
    """A message from `messages`, or 1 time in 20 random bytes."""
    message = draw(messages)  # first: a gate drawn first is taken far less often
    return draw(st.binary(max_size=64)) if _one_in(draw, 20) else message


@st.composite
def _message(
    draw,
    valid: dict[str, st.SearchStrategy],
    junk: dict[str, st.SearchStrategy],
    rarely: bool = False,
) -> Fields:
    """Every field from `valid` (None: left out) except up to three from `junk`, sometimes an
    unknown field, sometimes cut or padded bytes. `rarely`: junk in 1 message in 20 only."""
    names = sorted(valid)
    bad = set()
    if names and (not rarely or _one_in(draw, 20)):
        bad = draw(st.sets(st.sampled_from(names), max_size=min(3, len(names))))
    items = [(n, v) for n in names if (v := draw(junk[n] if n in bad else valid[n])) is not None]
    if not rarely:
        items += draw(st.lists(_unknown_field(), max_size=2))
    damaged = not rarely and _one_in(draw, 10)
    cut = draw(st.integers(1, 6)) if damaged and draw(st.booleans()) else 0
    tail = draw(st.binary(min_size=1, max_size=8)) if damaged and not cut else b""
    return Fields(tuple(items), cut, tail)


@dataclass
class Target:
    """What the fuzzed server runs: model name -> "char" or "glimpse", its limits, and the
    models whose tokenizer has an end-of-sequence marker (the poems): Generate on them may also
    stop on that marker, which is no character of the text."""

    models: dict[str, str]
    limits: Limits
    markers: frozenset[str] = frozenset()

    def first(self, kind: str) -> str | None:
        return next((n for n in sorted(self.models) if self.models[n] == kind), None)


def requests(rpc: str, target: Target) -> st.SearchStrategy:
    """Requests for `rpc` on `target`: a message as Fields (1 in 20: random bytes), for
    ClassifyGlimpses a stream of them."""
    char, glimpse = target.first("char"), target.first("glimpse")
    names = sorted(target.models)
    lim = target.limits
    refs = [SessionRef(k) for k in ("live", "stale", "near")] + (
        [SessionRef("other")] if char and glimpse else []
    )
    # every model (the other kind's: FAILED_PRECONDITION), near misses, junk
    model_junk = st.one_of(
        st.sampled_from(names),
        st.sampled_from([v for n in names for v in (n.upper(), n + " ", n[:-1], n + "\x00")]),
        _junk(HUGE_IDS),
    )
    session_junk = st.sampled_from(refs) | _junk(HUGE_IDS)
    sessions = st.sampled_from([None, SessionRef("live")])
    long_text = (lim.max_text, lim.max_text + 1, 20 * lim.max_text)
    flag_junk = ANY_INT | st.binary(max_size=4)
    floats_junk = st.one_of(F32, ODD_FLOATS, RAW_BITS, st.binary(max_size=4))
    if rpc == "ListModels":
        fields = _message({}, {})
    elif rpc == "CreateSession":
        fields = _message({"model": st.sampled_from(names)}, {"model": model_junk})
    elif rpc == "CloseSession":
        fields = _message({"session_id": st.just(SessionRef("live"))}, {"session_id": session_junk})
    elif rpc == "Score":
        fields = _message(
            {
                "model": st.just(char or names[0]),
                "session_id": sessions,
                "text": _texts(1, 60),
                "per_char": st.booleans(),
            },
            {
                "model": model_junk,
                "session_id": session_junk,
                "text": _junk(long_text),
                "per_char": flag_junk,
            },
        )
    elif rpc == "Generate":
        fields = _message(
            {
                "model": st.just(char or names[0]),
                "session_id": sessions,
                "prompt": st.none() | _texts(0, 30),
                "max_chars": st.integers(1, min(lim.max_chars, 30)),
                "temperature": st.none() | st.sampled_from([0.5, 1.0]) | st.floats(0, 2, width=32),
                "top_k": st.none() | st.integers(0, 10),
                "top_p": st.none() | st.floats(0, 1, width=32),
                "seed": st.none() | st.integers(0, (1 << 64) - 1),
                "stop": st.none() | st.lists(_texts(1, 3), max_size=2),
                "logprobs": st.booleans(),
            },
            {
                "model": model_junk,
                "session_id": session_junk,
                "prompt": _junk(long_text),
                "max_chars": st.sampled_from(
                    [0, lim.max_chars, lim.max_chars + 1, (1 << 32) - 1, (1 << 32) + 1]
                )
                | ANY_INT
                | st.binary(max_size=4),
                "temperature": floats_junk,
                "top_k": ANY_INT,
                "top_p": floats_junk,
                "seed": ANY_INT | st.binary(max_size=4),
                "stop": st.lists(
                    _texts(1, 3)
                    | _junk((lim.max_stop_chars, lim.max_stop_chars + 1, 1000, 10_000)),
                    max_size=8,
                ),
                "logprobs": flag_junk,
            },
        )
    elif rpc == "ClassifyGlimpses":
        return _glimpse_streams(glimpse or names[0], model_junk, session_junk)
    elif rpc in SESSION_RPCS:
        refs = [SessionRef("live")] + ([SessionRef("other")] if char and glimpse else [])
        fields = _message({"session_id": st.sampled_from(refs)}, {"session_id": session_junk})
    elif rpc == "RestoreSession":
        kinds = sorted(set(target.models.values()))
        limit = request_bytes_needed(lim.max_text, lim.max_stop, lim.max_stop_chars)
        fields = _message(
            {"data": st.builds(SnapshotRef, st.sampled_from(kinds), _mutations(names))},
            {"data": _junk((limit - 64, limit + 1)) | st.binary(min_size=100, max_size=20_000)},
        )
    else:
        raise ValueError(f"no rpc {rpc!r}; the rpcs are {RPCS}")
    return _mostly(fields)


def _mutations(names: list[str]) -> st.SearchStrategy:
    """How a real snapshot is changed (see `mutate`): 1 in 4 not at all."""
    hexes = st.text("0123456789abcdef", min_size=64, max_size=64)
    field = st.one_of(
        st.tuples(
            st.just("model"),
            st.sampled_from(names) | st.sampled_from(["nope", "x" * 300]) | st.text(min_size=1),
        ),
        st.tuples(st.just("model_id"), hexes),
        # positions at the edges (a real snapshot's is small)
        st.tuples(st.just("position"), st.sampled_from([(1 << 64) - 1, 1 << 63, (1 << 63) - 1, 0])),
        st.tuples(st.just("state_columns"), st.integers(1, 64)),
        st.tuples(st.just("nan"), st.integers(0, 1 << 20)),
        st.tuples(st.just("logits"), st.none() | st.integers(1, 300)),
    ).map(lambda t: ("field", *t))
    return st.one_of(
        st.just(()),
        st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
        st.tuples(st.just("cut"), st.integers(1, 200)),
        st.tuples(st.just("head"), st.integers(0, 100)),
        st.tuples(st.just("splice"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("pad"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("zeros"), st.sampled_from([1000, 30_000])),  # past the server's bound
        field,
    )


def _glimpses() -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(valid glimpses: random ones or, cheaper to draw, one of GLIMPSES; bad ones: a wrong
    length, one value NaN, infinite or outside [0, 1], or bytes that are not whole floats)."""
    valid = st.sampled_from(GLIMPSES) | st.lists(
        st.floats(0, 1, width=32), min_size=49, max_size=49
    )
    one_bad = st.tuples(
        st.sampled_from(GLIMPSES), st.integers(0, 48), st.one_of(F32, ODD_FLOATS, RAW_BITS)
    ).map(lambda t: t[0][: t[1]] + (t[2],) + t[0][t[1] + 1 :])
    length = st.integers(0, 120).map(lambda n: (0.5,) * n)
    return valid, st.one_of(one_bad, length, st.binary(max_size=200))


@st.composite
def _glimpse_streams(draw, model: str, model_junk, session_junk) -> tuple:
    """A stream of 0 to 22 glimpse messages (1 in 20: 40 to 80, an image's 20 glimpses are the
    usual); the first names the model or a session, the others carry a glimpse, rarely junk in
    a field."""
    valid, bad = _glimpses()
    first = _message(
        {
            "model": st.sampled_from([model, None]),
            "session_id": st.sampled_from([None, SessionRef("live")]),
            "pixels": valid,
        },
        {"model": model_junk, "session_id": session_junk, "pixels": bad},
    )
    rest = _message(
        {
            "model": st.sampled_from([None, None, model]),
            "session_id": st.none(),
            "pixels": st.sampled_from(GLIMPSES),
        },
        {"model": model_junk, "session_id": session_junk, "pixels": bad},
        rarely=True,
    )
    n = draw(st.integers(40, 80) if _one_in(draw, 20) else st.integers(0, 22))
    if n == 0:
        return ()
    return (draw(_mostly(first)),) + tuple(draw(st.lists(rest, min_size=n - 1, max_size=n - 1)))


# ---------------------------------------------------------------------------------- checker
@dataclass
class Outcome:
    code: str  # the status code's name: "OK", "INVALID_ARGUMENT", ...
    problem: str | None  # what was wrong with the answer; None: it is the documented one


def _good_glimpse(pixels) -> bool:
    x = np.asarray(pixels, dtype=np.float32)
    return x.shape == (49,) and bool(np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1)


def _clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


class Fuzzer:
    """Sends fuzzed requests to a server as raw bytes and judges its answers against the
    documented codes; keeps count of the sessions it holds open."""

    def __init__(self, channel: grpc.Channel, limits: Limits, timeout: float = 30.0) -> None:
        self.channel, self.limits, self.timeout = channel, limits, timeout
        self.max_request = request_bytes_needed(
            limits.max_text, limits.max_stop, limits.max_stop_chars
        )
        self.stub = pb_grpc.InferenceStub(channel)
        listed = self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout).models
        self.target = Target(
            {m.name: "glimpse" if m.num_classes else "char" for m in listed},
            limits,
            frozenset(m.name for m in listed if m.task == "poems"),
        )
        self.live: dict[str, str] = {}  # session id -> model: the sessions open now
        self.stale = self._create(min(self.target.models))
        self._close(self.stale)
        # per kind, a real snapshot of its first model (a session that took in some input);
        # per model snapshotted, (export identity, state shape, logits size) as it says
        self.snaps: dict[str, bytes] = {}
        self.exports: dict[str, tuple[str, tuple, int | None]] = {}
        for kind in sorted(set(self.target.models.values())):
            sid = self._create(self.target.first(kind))
            if kind == "char":
                self.stub.Score(pb.ScoreRequest(session_id=sid, text=GOOD_TEXT), timeout=timeout)
            else:
                list(
                    self.stub.ClassifyGlimpses(
                        iter([pb.GlimpseRequest(session_id=sid, pixels=GLIMPSES[0])]),
                        timeout=timeout,
                    )
                )
            self.snaps[kind] = self.stub.SnapshotSession(
                pb.SnapshotSessionRequest(session_id=sid), timeout=timeout
            ).data
            self._close(sid)
            s = snapshot.decode(self.snaps[kind])
            self.exports[s.model] = (
                s.model_id,
                s.state.shape,
                None if s.logits is None else s.logits.size,
            )
        self._calls = {}
        for rpc in RPCS:
            method, path = METHODS[rpc], f"/{SERVICE}/{rpc}"
            kind = (
                "stream_stream"
                if method.client_streaming
                else "unary_stream"
                if method.server_streaming
                else "unary_unary"
            )
            self._calls[rpc] = getattr(channel, kind)(path)  # no (de)serializers: bytes in and out
        self._strategies: dict[str, st.SearchStrategy] = {}
        self.baseline = self._good()

    def requests(self, rpc: str) -> st.SearchStrategy:
        if rpc not in self._strategies:
            self._strategies[rpc] = requests(rpc, self.target)
        return self._strategies[rpc]

    # -------------------------------------------------------------- sending
    def send(self, rpc: str, request: Request) -> Outcome:
        """Send one request and judge the answer; sessions created for it are closed after."""
        messages = request if isinstance(request, tuple) else (request,)
        kind = "glimpse" if rpc == "ClassifyGlimpses" else "char"
        opened: list[str] = []
        try:
            method = METHODS[rpc]
            cls = getattr(pb, method.input_type.name)
            wire = [
                encode(m, cls.DESCRIPTOR, lambda ref: self._resolve(ref, kind, opened))
                for m in messages
            ]
            parsed = [parse(cls, w) for w in wire]
            allowed, answers = self._expect(rpc, parsed)
            # a message larger than the receive limit (sized from the limits: the server's
            # default) is refused by gRPC before anything else looks at it
            oversized = next((i for i, w in enumerate(wire) if len(w) > self.max_request), None)
            if oversized is not None and oversized <= answers:
                allowed, answers = {RE}, oversized
            code, details, received = self._call(rpc, wire)
            out = [getattr(pb, method.output_type.name).FromString(r) for r in received]
            if code == OK and rpc in ("CreateSession", "ForkSession", "RestoreSession"):
                self.live[out[0].session_id] = out[0].model
                opened.append(out[0].session_id)
            if code == OK and rpc == "CloseSession" and parsed[0] is not None:
                self.live.pop(parsed[0].session_id, None)
            problem = self._judge(rpc, parsed, allowed, answers, code, details, out)
            released = self._release(opened)
            return Outcome(code, problem or released)
        except grpc.RpcError as exc:  # a helper call (creating, probing a session) failed
            self._forget(opened)
            return Outcome(
                "HELPER", f"a helper call got {exc.code().name}: {_clip(exc.details() or '')}"
            )

    def still_good(self) -> str | None:
        """None when the known-good requests get the answers they got at the start."""
        try:
            now = self._good()
        except grpc.RpcError as exc:
            return f"a known-good request failed: {exc.code().name} {_clip(exc.details() or '')}"
        for key, want in self.baseline.items():
            got = now[key]
            same = (
                got == want
                if key == "models"
                else len(got) == len(want) and np.allclose(got, want, rtol=1e-6)
            )
            if not same:
                return (
                    f"the known-good {key} request changed: {_clip(str(got))} != {_clip(str(want))}"
                )
        return None

    def _good(self) -> dict:
        t = self.target
        out = {
            "models": [
                m.name
                for m in self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models
            ]
        }
        if t.first("char"):
            r = self.stub.Score(
                pb.ScoreRequest(model=t.first("char"), text=GOOD_TEXT, per_char=True),
                timeout=self.timeout,
            )
            out["score"] = [r.total_bits, *r.bits]
        if t.first("glimpse"):
            stream = [
                pb.GlimpseRequest(model=t.first("glimpse") if i == 0 else "", pixels=GLIMPSES[i])
                for i in range(GOOD_GLIMPSES)
            ]
            out["glimpses"] = [
                p
                for r in self.stub.ClassifyGlimpses(iter(stream), timeout=self.timeout)
                for p in r.probabilities
            ]
        return out

    def _call(self, rpc: str, wire: list[bytes]) -> tuple[str, str, list[bytes]]:
        """(status code name, details, response bytes received before it)."""
        method, call = METHODS[rpc], self._calls[rpc]
        received: list[bytes] = []
        try:
            if method.client_streaming:
                received.extend(call(iter(wire), timeout=self.timeout))
            elif method.server_streaming:
                received.extend(call(wire[0], timeout=self.timeout))
            else:
                received.append(call(wire[0], timeout=self.timeout))
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or "", received
        return OK, "", received

    # ------------------------------------------------------------ sessions
    def _create(self, model: str) -> str:
        sid = self.stub.CreateSession(
            pb.CreateSessionRequest(model=model), timeout=self.timeout
        ).session_id
        self.live[sid] = model
        return sid

    def _close(self, sid: str) -> None:
        self.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=self.timeout)
        del self.live[sid]

    def _resolve(self, ref: SessionRef | SnapshotRef, kind: str, opened: list[str]) -> str | bytes:
        if isinstance(ref, SnapshotRef):
            return mutate(self.snaps[ref.kind], ref.mutation)
        if ref.kind == "stale":
            return self.stale
        t = self.target
        other = "glimpse" if kind == "char" else "char"
        model = t.first(other) if ref.kind == "other" else (t.first(kind) or min(t.models))
        sid = self._create(model)
        opened.append(sid)
        return sid[:-1] + ("B" if sid[-1] == "A" else "A") if ref.kind == "near" else sid

    def _release(self, opened: list[str]) -> str | None:
        """Close the sessions opened for a request; first check that each is free again and
        works (a session left in use would answer ABORTED for ever)."""
        problem = None
        for sid in [s for s in opened if s in self.live]:
            try:
                if self.target.models[self.live[sid]] == "char":
                    self.stub.Score(pb.ScoreRequest(session_id=sid, text="a"), timeout=self.timeout)
                else:
                    stream = iter([pb.GlimpseRequest(session_id=sid, pixels=GLIMPSES[0])])
                    list(self.stub.ClassifyGlimpses(stream, timeout=self.timeout))
            except grpc.RpcError as exc:
                problem = (
                    problem
                    or f"its session fails after it: {exc.code().name} {_clip(exc.details() or '')}"
                )
            self._close(sid)
        return problem

    def _forget(self, opened: list[str]) -> None:
        for sid in opened:
            self.live.pop(sid, None)

    # --------------------------------------------------------------- oracle
    def _open_errors(self, model: str, session_id: str, kind: str) -> set[str]:
        """The codes a call naming `model` and `session_id` may get before its own checks."""
        if session_id:
            if session_id not in self.live:
                return {NF}
            if model and model != self.live[session_id]:
                return {IA}
            model = self.live[session_id]
        if not model:
            return {IA}
        if model not in self.target.models:
            return {NF}
        return {FP} if self.target.models[model] != kind else set()

    def _expect(self, rpc: str, parsed: list) -> tuple[set[str], int]:
        """(the codes the request may get: {OK} when it is good, the responses that come
        before the end of the call)."""
        if rpc == "ClassifyGlimpses":
            return self._expect_glimpses(parsed)
        m, lim = parsed[0], self.limits
        if m is None:
            errors = {IA}
        elif rpc == "ListModels":
            errors = set()
        elif rpc == "CreateSession":
            errors = {IA} if not m.model else {NF} if m.model not in self.target.models else set()
            errors |= {RE} if not errors and len(self.live) >= lim.max_sessions else set()
        elif rpc == "CloseSession":
            errors = {IA} if not m.session_id else set() if m.session_id in self.live else {NF}
        elif rpc == "Score":
            errors = {IA} if not m.text else {RE} if len(m.text) > lim.max_text else set()
            errors |= self._open_errors(m.model, m.session_id, "char")
        elif rpc in SESSION_RPCS:
            errors = {IA} if not m.session_id else set() if m.session_id in self.live else {NF}
            errors |= (
                {RE}
                if not errors and rpc == "ForkSession" and len(self.live) >= lim.max_sessions
                else set()
            )
        elif rpc == "RestoreSession":
            codes = self._restore_codes(m.data)
            return codes | (
                {RE} if OK in codes and len(self.live) >= lim.max_sessions else set()
            ), 1
        else:  # Generate
            bad = (
                not 1 <= m.max_chars <= lim.max_chars
                or not math.isfinite(m.temperature)
                or m.temperature < 0
                or not 0 <= m.top_p <= 1
                or len(m.stop) > lim.max_stop
                or "" in m.stop
                or any(len(x) > lim.max_stop_chars for x in m.stop)
            )
            errors = ({IA} if bad else set()) | ({RE} if len(m.prompt) > lim.max_text else set())
            errors |= self._open_errors(m.model, m.session_id, "char")
        if errors:
            return errors, 0
        return {OK}, 0 if rpc == "Generate" else 1

    def _restore_codes(self, data: bytes) -> set[str]:
        """The codes RestoreSession may answer for `data` (docs/serving.md, "Snapshot, restore,
        fork"), from what the real snapshots said of their exports."""
        if not data:
            return {IA}
        # larger than the largest snapshot of the models known here: the server's bound (over
        # all its models) may refuse it before reading it
        largest = max(
            snapshot.max_size(shape, logits or 0) for _, shape, logits in self.exports.values()
        )
        bound = {IA} if len(data) > largest else set()
        try:
            s = snapshot.decode(data)
        except snapshot.SnapshotInvalid:
            return {IA}
        if s.model not in self.exports:  # not served, or served under another export
            return {FP} | bound
        model_id, shape, logits = self.exports[s.model]
        if s.model_id != model_id:
            return {FP} | bound
        if s.state.shape != shape or (
            s.logits is not None and s.logits.size != (logits or s.logits.size)
        ):
            return {IA}
        return ({IA} if s.position >= 1 << 63 else {OK}) | bound

    def _expect_glimpses(self, parsed: list) -> tuple[set[str], int]:
        name = ""
        for i, m in enumerate(parsed):
            if m is None:
                return {IA}, i
            if i == 0:
                errors = self._open_errors(m.model, m.session_id, "glimpse")
                name = self.live.get(m.session_id, m.model)
            else:
                errors = {IA} if (m.model and m.model != name) or m.session_id else set()
            if not _good_glimpse(m.pixels):
                errors.add(IA)
            if errors:
                return errors, i
        return {OK}, len(parsed)

    def _judge(
        self,
        rpc: str,
        parsed: list,
        allowed: set[str],
        answers: int,
        code: str,
        details: str,
        out: list,
    ) -> str | None:
        if code not in allowed:
            return (
                f"{rpc} got {code} ({_clip(details)!r}); documented: {' or '.join(sorted(allowed))}"
            )
        if code != OK and not details:
            return f"{rpc} got {code} with no message saying what was wrong"
        if rpc == "Generate":
            return (
                self._check_generate(parsed[0], out)
                if code == OK
                else (f"Generate failed with {code} after {len(out)} messages" if out else None)
            )
        if rpc != "ClassifyGlimpses":
            answers = int(code == OK)  # a unary call: its answer, or its status
        if len(out) != answers and not (
            code == RE and rpc == "ClassifyGlimpses" and len(out) < answers
        ):
            # (a stream refused by gRPC for a message too large may lose the answers in flight)
            return f"{rpc} answered {len(out)} messages before {code}, expected {answers}"
        if rpc == "ClassifyGlimpses":
            return self._check_glimpses(out)
        if code != OK:
            return None
        m, r = parsed[0], out[0]
        if rpc == "ListModels" and [x.name for x in r.models] != sorted(self.target.models):
            return f"ListModels listed {[x.name for x in r.models]}"
        if rpc == "CreateSession" and (r.model != m.model or len(r.session_id) < 16):
            return f"CreateSession answered {r}"
        if rpc == "Score":
            return self._check_score(m, r)
        if rpc in SESSION_RPCS or rpc == "RestoreSession":
            return self._check_session(rpc, m, r)
        return None

    def _check_session(self, rpc: str, m, r) -> str | None:
        """A fuzzed session is fresh (position 0, idle); a restored one is the snapshot's."""
        if rpc == "RestoreSession":
            s = snapshot.decode(m.data)
            want = (s.model, s.position)
        else:
            want = (self.live[m.session_id], 0)
        got = (r.model, r.position)
        if rpc == "SnapshotSession":
            s = snapshot.decode(r.data)
            if (s.model, s.position) != want:
                return f"SnapshotSession's data says {(s.model, s.position)}, expected {want}"
        elif rpc == "GetSession" and (
            r.session_id != m.session_id or r.in_use or r.idle_timeout_seconds < 1
        ):
            return f"GetSession answered {r}"
        elif rpc in ("ForkSession", "RestoreSession") and (
            r.session_id in (getattr(m, "session_id", ""), "") or r.in_use
        ):
            return f"{rpc} answered {r}"
        return None if got == want else f"{rpc} answered model and position {got}, expected {want}"

    @staticmethod
    def _check_score(m, r) -> str | None:
        n = len(m.text)
        if (
            r.num_chars != n
            or not 0 <= r.unknown_chars <= n
            or len(r.bits) != (n if m.per_char else 0)
        ):
            return (
                f"Score of {n} characters (per_char={m.per_char}) answered {r.num_chars} "
                f"characters, {r.unknown_chars} unknown, {len(r.bits)} bits"
            )
        if not (
            math.isfinite(r.total_bits)
            and r.total_bits >= 0
            and math.isclose(r.bits_per_char, r.total_bits / n)
        ):
            return (
                f"Score answered total_bits {r.total_bits}, bits_per_char {r.bits_per_char} "
                f"for {n} characters"
            )
        if m.per_char and not math.isclose(sum(r.bits), r.total_bits, rel_tol=1e-4, abs_tol=1e-3):
            return f"Score's bits sum to {sum(r.bits)}, not total_bits {r.total_bits}"
        return None

    def _check_generate(self, m, out: list) -> str | None:
        text = "".join(r.text for r in out)
        reasons = [r.finish_reason for r in out]
        marker = (m.model or self.live.get(m.session_id)) in self.target.markers
        if (
            not out
            or reasons[-1] not in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP_SEQUENCE)
            or any(reasons[:-1])
        ):
            return f"Generate's finish reasons were {reasons}"
        if reasons[-1] == pb.FINISH_REASON_LENGTH and len(text) != m.max_chars:
            return (
                f"Generate made {len(text)} characters ({text!r}) with FINISH_REASON_LENGTH, "
                f"max_chars {m.max_chars}"
            )
        stopped = any(text.endswith(s) for s in m.stop) or (marker and len(text) < m.max_chars)
        if reasons[-1] == pb.FINISH_REASON_STOP_SEQUENCE and not (
            len(text) <= m.max_chars and stopped
        ):
            return f"Generate stopped at {text!r}, stop strings {list(m.stop)}"
        bits = [b for r in out for b in r.bits]
        want = (
            {len(text), len(text) + marker} if m.logprobs else {0}
        )  # the marker has bits, no text
        if len(bits) not in want or not all(math.isfinite(b) and b >= 0 for b in bits):
            return (
                f"Generate returned {len(bits)} bits {bits[:8]} for {len(text)} characters "
                f"(logprobs={m.logprobs})"
            )
        return None

    @staticmethod
    def _check_glimpses(out: list) -> str | None:
        for i, r in enumerate(out):
            p = np.asarray(r.probabilities)
            if (
                r.step != i + 1
                or not len(p)
                or not np.isfinite(p).all()
                or abs(p.sum() - 1) > 1e-4
                or r.predicted_class != int(np.argmax(p))
            ):
                return (
                    f"glimpse {i + 1} answered step {r.step}, class {r.predicted_class}, "
                    f"probabilities {p}"
                )
        return None


def fuzz(
    fuzzer: Fuzzer, rpc: str, examples: int, report: Callable[[Outcome], None], seed: int = 0
) -> None:
    """Send `examples` requests of `rpc` drawn by hypothesis from `seed`, and report each
    outcome. Generation only: nothing raises, so there is nothing to shrink."""

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=SLOW_EXAMPLES,
    )
    @given(fuzzer.requests(rpc))
    def run(request) -> None:
        report(fuzzer.send(rpc, request))

    run()
