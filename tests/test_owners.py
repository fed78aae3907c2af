"""Owners in shared session stores: real `nlstm serve` processes with API keys and
--max-sessions-per-client, two replicas sharing a real redis-server and a server restarted on the
same file store. A session made under one key is NOT_FOUND to another on every replica and after
a restart, exactly as with the memory store; the per-client bound counts a client's sessions
over every replica and across the restart, and an expiry (Redis's own) frees a slot.

Skips without redis-server (.ci/run installs it)."""

from __future__ import annotations

import secrets
import signal
import time

import grpc
import pytest

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.testing.process import Replica
from training.testing.models import CHAR_MODEL

KEYS = [secrets.token_urlsafe(24) for _ in range(4)]  # A, B: ownership; C, D: the bound
KEY_A, KEY_B, KEY_C, KEY_D = KEYS
IDLE = 4.0  # the replicas' idle timeout, seconds
BOUND = 2  # --max-sessions-per-client


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> tuple[str, ...]:
    """The flags of a server with the keys and the bound."""
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text("\n".join(KEYS) + "\n")
    return "--api-keys-file", str(path), "--max-sessions-per-client", str(BOUND)


@pytest.fixture(scope="module")
def pair(models_dir, redis_server, keyed):
    replicas = [Replica(models_dir, redis_server.url, *keyed, "--idle-timeout", str(IDLE))]
    replicas.append(Replica(models_dir, redis_server.url, *keyed, "--idle-timeout", str(IDLE)))
    yield replicas
    for r in replicas:
        r.close()


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def create(replica, key: str) -> str:
    return replica.stub.CreateSession(
        pb.CreateSessionRequest(model=CHAR_MODEL), metadata=auth(key)
    ).session_id


def score(replica, key: str, sid: str, text: str = "the cat") -> pb.ScoreResponse:
    return replica.stub.Score(
        pb.ScoreRequest(session_id=sid, text=text, per_char=True), metadata=auth(key)
    )


def get(replica, key: str, sid: str) -> pb.Session:
    return replica.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=auth(key))


def close(replica, key: str, sid: str) -> None:
    replica.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=auth(key))


def refusal(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value.code(), info.value.details()


def session_calls(replica, sid: str):
    """Every rpc that names a session, as (name, call with metadata)."""
    s = replica.stub
    return [
        ("Score", lambda md: s.Score(pb.ScoreRequest(session_id=sid, text="a"), metadata=md)),
        (
            "Generate",
            lambda md: list(
                s.Generate(pb.GenerateRequest(session_id=sid, max_chars=3), metadata=md)
            ),
        ),
        ("GetSession", lambda md: s.GetSession(pb.GetSessionRequest(session_id=sid), metadata=md)),
        (
            "SnapshotSession",
            lambda md: s.SnapshotSession(pb.SnapshotSessionRequest(session_id=sid), metadata=md),
        ),
        (
            "ForkSession",
            lambda md: s.ForkSession(pb.ForkSessionRequest(session_id=sid), metadata=md),
        ),
        (
            "CloseSession",
            lambda md: s.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=md),
        ),
    ]


def test_a_session_is_its_keys_on_every_replica(pair, redis_server):
    import redis

    a, b = pair
    sid = create(a, KEY_A)
    score(b, KEY_A, sid)  # A's session moves between replicas as before
    unknown = sid[:-1] + ("B" if sid[-1] == "A" else "A")
    for replica in (a, b):
        for name, call in session_calls(replica, sid):
            code, details = refusal(call, auth(KEY_B))
            # worded exactly as for an id that does not exist: B learns nothing
            assert code == grpc.StatusCode.NOT_FOUND, name
            assert details == refusal(dict(session_calls(replica, unknown))[name], auth(KEY_A))[
                1
            ].replace(unknown, sid)
    assert get(b, KEY_A, sid).position == len(
        "the cat"
    )  # untouched by B's calls (its close did nothing)
    # a snapshot carries state, not authority: restored under B it is B's session, a fork is its
    # caller's
    snap = a.stub.SnapshotSession(pb.SnapshotSessionRequest(session_id=sid), metadata=auth(KEY_A))
    restored = b.stub.RestoreSession(
        pb.RestoreSessionRequest(data=snap.data), metadata=auth(KEY_B)
    ).session_id
    fork = b.stub.ForkSession(
        pb.ForkSessionRequest(session_id=sid), metadata=auth(KEY_A)
    ).session_id
    assert get(a, KEY_B, restored).position == get(b, KEY_A, fork).position == len("the cat")
    assert (
        refusal(get, b, KEY_A, restored)[0]
        == refusal(get, a, KEY_B, fork)[0]
        == grpc.StatusCode.NOT_FOUND
    )
    assert list(score(a, KEY_B, restored).bits) == pytest.approx(
        list(score(a, KEY_A, fork).bits), rel=1e-5
    )
    # the stored records name the owner by its key's fingerprint, never the key
    r = redis.Redis.from_url(redis_server.url)
    stored = b"".join(r.dump(k) or b"" for k in r.scan_iter("nlstm:*")) + b"".join(
        r.scan_iter("nlstm:*")
    )
    assert all(k.encode() not in stored for k in KEYS) and b"key:" in stored
    for replica, key, s in ((b, KEY_A, sid), (a, KEY_B, restored), (a, KEY_A, fork)):
        close(replica, key, s)


def test_the_per_client_bound_holds_across_replicas_until_a_close_or_an_expiry(pair):
    a, b = pair
    first, second = create(a, KEY_C), create(b, KEY_C)
    for replica in (a, b):
        code, details = refusal(create, replica, KEY_C)
        assert (
            code == grpc.StatusCode.RESOURCE_EXHAUSTED
            and f"per-client session limit is {BOUND}" in details
        )
        # a fork or a restore is a new session of its caller: bounded too
        assert (
            refusal(
                replica.stub.ForkSession,
                pb.ForkSessionRequest(session_id=first),
                metadata=auth(KEY_C),
            )[0]
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
    other = create(b, KEY_D)  # the bound is per client
    close(a, KEY_C, first)  # closed on A: a slot on B
    third = create(b, KEY_C)
    assert refusal(create, a, KEY_C)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    # the sessions expire through Redis (nobody closes them): the slots are free on both replicas
    time.sleep(IDLE + 0.5)
    for sid in (second, third):
        assert refusal(get, a, KEY_C, sid)[0] == grpc.StatusCode.NOT_FOUND
    fresh = [create(a, KEY_C), create(b, KEY_C)]
    assert refusal(create, b, KEY_C)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    for sid in fresh:
        close(a, KEY_C, sid)
    assert refusal(get, b, KEY_D, other)[0] == grpc.StatusCode.NOT_FOUND  # expired too


def test_owners_and_the_bound_survive_a_restart_on_a_file_store(models_dir, keyed, tmp_path):
    store = f"file:{tmp_path / 'sessions'}"
    first = Replica(models_dir, store, *keyed, "--idle-timeout", "600")
    try:
        mine, spare = create(first, KEY_A), create(first, KEY_A)
        theirs = create(first, KEY_B)
        before = score(first, KEY_A, mine, "the cat sat")
        first.server.proc.send_signal(signal.SIGTERM)
        assert first.server.proc.wait(30) == 0
    finally:
        first.close()
    second = Replica(models_dir, store, *keyed, "--idle-timeout", "600")
    try:
        assert get(second, KEY_A, mine).position == before.position == len("the cat sat")
        for name, call in session_calls(second, mine):
            assert refusal(call, auth(KEY_B))[0] == grpc.StatusCode.NOT_FOUND, name
        assert refusal(get, second, KEY_A, theirs)[0] == grpc.StatusCode.NOT_FOUND
        assert get(second, KEY_B, theirs).position == 0
        # A held its 2 sessions before the restart: still at the bound after it
        assert refusal(create, second, KEY_A)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        close(second, KEY_A, spare)
        assert create(second, KEY_A)
        assert score(second, KEY_A, mine, " on the mat").position == len("the cat sat on the mat")
    finally:
        second.close()
