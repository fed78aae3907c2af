"""The fuzzer's request strategies (hypothesis; see serving/testing/fuzz.py): for every rpc,
messages with mostly-invalid fields mixed with valid ones, sometimes unknown fields, cut or
padded bytes, or random bytes; glimpse streams; and the mutations of real snapshots that
RestoreSession gets. `Target` says what the fuzzed server runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck
from hypothesis import strategies as st

from serving.limits import Limits, request_bytes_needed
from serving.testing.fuzz_wire import Fields, SessionRef, SnapshotRef

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
# what valid texts are made of; other characters are the unknown symbol (counted, still valid)
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"
HUGE_IDS = (10_000, 100_000)  # characters of a huge model name or session id
# a few valid glimpses: most valid glimpse messages draw one of these (cheaper than 49 draws)
GLIMPSES = tuple(
    tuple(float(v) for v in row)
    for row in np.random.default_rng(0).random((8, 49), dtype=np.float32)
) + (
    (0.0,) * 49,
    (1.0,) * 49,
)


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

    def firsts(self) -> dict[str, str]:
        """Kind -> its first model (by name), for each kind the server has."""
        out: dict[str, str] = {}
        for name in sorted(self.models):
            out.setdefault(self.models[name], name)
        return out


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
