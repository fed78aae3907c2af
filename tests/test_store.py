"""The session store backends (serving/store.py) against a real file system and a real
redis-server: blobs with expiry, leases with owners and expiry, conditional writes, a store
that goes away and comes back."""

from __future__ import annotations

import time

import numpy as np
import pytest

from serving.durable import DurableSessions, SessionCorrupt, SessionLost, SessionMismatch
from serving.sessions import SessionBusy, SessionNotFound, TooManySessions
from serving.store import (
    GONE,
    LEASE_LOST,
    SAVED,
    FileBackend,
    StoreUnavailable,
    open_backend,
)
from serving.store_redis import RedisBackend


@pytest.fixture(params=["file", "redis"])
def backend(request, tmp_path):
    if request.param == "file":
        b = FileBackend(tmp_path / "sessions")
    else:
        server = request.getfixturevalue("redis_server")
        server.flush()
        b = RedisBackend(server.url)
    yield b
    b.close()


def test_put_get_delete(backend):
    assert backend.get("abc") is None
    backend.put("abc", b"\x00state\xff" * 100, ttl=60)
    assert backend.get("abc") == b"\x00state\xff" * 100
    backend.put("abc", b"newer", ttl=60)  # replaced whole
    assert backend.get("abc") == b"newer"
    assert backend.count() >= 1
    assert backend.delete("abc") is True
    assert backend.get("abc") is None and backend.delete("abc") is False


@pytest.mark.parametrize("sid", ["", "../../etc/passwd", "a/b", "nlstm:*", "x" * 129, "sp ace"])
def test_ids_that_are_no_session_are_never_keys_or_paths(backend, sid):
    assert backend.get(sid) is None
    assert backend.delete(sid) is False
    assert backend.commit(sid, "me", b"x", 60, 5) == GONE
    assert backend.peek(sid) == (None, False)
    with pytest.raises(ValueError, match="not a session id"):
        backend.put(sid, b"x", 60)


def test_sessions_expire_after_their_ttl_and_writes_renew_it(backend):
    backend.put("short", b"a", ttl=0.3)
    backend.put("kept", b"b", ttl=0.3)
    assert backend.acquire("kept", "me", 5)
    time.sleep(0.2)
    assert backend.commit("kept", "me", b"c", 0.6, 5) == SAVED  # a write renews the idle timeout
    time.sleep(0.25)
    assert backend.get("short") is None
    assert backend.get("kept") == b"c"
    assert backend.commit("kept", "me", None, 0.6, 5) == SAVED  # so does a renewal without a write
    time.sleep(0.4)
    assert backend.get("kept") == b"c"
    backend.expire()
    assert backend.get("short") is None and backend.count() == 1


def test_lease_is_exclusive_and_only_its_owner_releases_it(backend):
    backend.put("s", b"x", ttl=60)
    assert backend.acquire("s", "call-a", 5) is True
    assert backend.acquire("s", "call-b", 5) is False
    assert backend.release("s", "call-b") is False  # not b's to give back
    assert backend.acquire("s", "call-b", 5) is False
    assert backend.peek("s") == (b"x", True)
    assert backend.release("s", "call-a") is True
    assert backend.peek("s") == (b"x", False)
    assert backend.acquire("s", "call-b", 5) is True
    assert backend.release("s", "call-a") is False
    # a commit that gives the lease back writes and frees the session in one step
    assert backend.commit("s", "call-b", b"y", 60, None) == SAVED
    assert backend.peek("s") == (b"y", False)
    assert backend.commit("s", "call-b", b"z", 60, None) == LEASE_LOST


def test_lease_of_a_dead_holder_lapses(backend):
    backend.put("s", b"x", ttl=60)
    assert backend.acquire("s", "dead", 0.3)
    assert not backend.acquire("s", "alive", 5)
    time.sleep(0.4)
    assert backend.acquire("s", "alive", 5)
    # the dead holder, back from a long pause, can no longer write over the new holder
    assert backend.commit("s", "dead", b"stale", 60, 5) == LEASE_LOST
    assert backend.commit("s", "dead", None, 60, None) == LEASE_LOST
    assert backend.get("s") == b"x"
    assert backend.commit("s", "alive", b"new", 60, 5) == SAVED
    assert backend.get("s") == b"new"


def test_a_closed_session_is_not_resurrected_by_its_running_call(backend):
    backend.put("s", b"x", ttl=60)
    assert backend.acquire("s", "call", 5)
    assert backend.delete("s") is True  # CloseSession from another call
    assert backend.commit("s", "call", b"late", 60, 5) == LEASE_LOST  # close took the lease too
    assert backend.get("s") is None
    backend.put("t", b"x", ttl=60)
    assert backend.acquire("t", "call", 5)
    backend.put("t", b"x", ttl=0.1)
    time.sleep(0.2)  # expired under a held lease (its call stopped renewing)
    assert backend.commit("t", "call", b"late", 60, 5) == GONE
    assert backend.commit("t", "call", None, 60, 5) == GONE
    assert backend.get("t") is None


def test_file_store_survives_a_new_process_and_leaves_no_partial_files(tmp_path):
    a = FileBackend(tmp_path)
    a.put("s1", b"one", ttl=60)
    assert a.acquire("s1", "x", 5)
    assert a.commit("s1", "x", b"two", 60, 5) == SAVED
    a.close()
    (tmp_path / "sessions" / "s1.snap.tmp-dead").write_bytes(b"half a write")  # a killed writer
    (tmp_path / "sessions" / ".s1.snap.dead_000.tmp").write_bytes(b"half")  # serving/files.py's
    (tmp_path / "leases" / ".s1.dead_000.tmp").write_bytes(b"x 1")
    b = FileBackend(tmp_path)  # as a restarted server opens it
    assert b.get("s1") == b"two"
    assert sorted(p.name for p in (tmp_path / "sessions").iterdir()) == ["s1.snap"]
    assert sorted(p.name for p in (tmp_path / "leases").iterdir()) == ["s1"]
    assert not b.acquire("s1", "y", 5)  # x's lease is still recorded
    # the recorded expiry is wall-clock time: it survives the restart too
    assert (tmp_path / "sessions" / "s1.snap").stat().st_mtime > time.time() + 50


def test_file_store_refuses_a_directory_it_cannot_use(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ValueError, match="cannot use"):
        FileBackend(tmp_path / "file")


def test_open_backend_urls(tmp_path):
    assert open_backend("memory") is None
    b = open_backend(f"file:{tmp_path}/s")
    assert isinstance(b, FileBackend) and (tmp_path / "s" / "sessions").is_dir()
    assert isinstance(open_backend("redis://127.0.0.1:1/0"), RedisBackend)  # connects lazily
    with pytest.raises(ValueError, match=r"memory .*file:DIR or redis://HOST:PORT/DB"):
        open_backend("postgres://db/sessions")
    with pytest.raises(ValueError, match="needs a directory"):
        open_backend("file:")


def test_redis_password_is_masked_in_messages():
    b = RedisBackend("redis://user:s3cret@127.0.0.1:1/0", timeout=0.2)
    with pytest.raises(StoreUnavailable) as info:
        b.get("abc")
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
    assert "unreachable" in str(info.value)


def test_redis_down_is_unavailable_then_recovers_by_itself(redis_server):
    b = RedisBackend(redis_server.url, timeout=0.5)
    b.put("s", b"x", ttl=60)
    redis_server.stop()
    try:
        t0 = time.perf_counter()
        for op in (
            lambda: b.get("s"),
            lambda: b.put("s", b"y", 60),
            lambda: b.acquire("s", "o", 5),
            b.ping,
        ):
            with pytest.raises(StoreUnavailable, match="unreachable"):
                op()
        assert time.perf_counter() - t0 < 5  # refused at once, not after long retries
    finally:
        redis_server.start()
    # for a moment after a failure, commands fail at once without trying (a Redis that drops
    # packets would cost each 2 x timeout); then the same client reconnects, no restart needed
    deadline = time.monotonic() + 5
    while True:
        try:
            b.ping()
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert b.get("s") is None  # this Redis came back empty (no persistence in the tests)
    b.put("s", b"z", ttl=60)
    assert b.get("s") == b"z"
    b.close()


# ------------------------------------------------------------- sessions over a backend
def durable(backend, **kw) -> DurableSessions:
    kw.setdefault("lease_ttl", 5.0)
    return DurableSessions(backend, {"m": "a" * 64, "other": "b" * 64}, **kw)


def test_durable_sessions_round_trip_and_one_call_at_a_time(backend):
    store = durable(backend, key=b"k" * 16)
    state, logits = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(5, np.float32)
    s = store.create("m", state, logits, position=7)
    held = store.acquire(s.session_id)
    assert (held.model, held.position, held.in_use) == ("m", 7, True)
    assert np.array_equal(held.state, state) and np.array_equal(held.logits, logits)
    with pytest.raises(SessionBusy, match="in use by another call"):
        store.acquire(s.session_id)
    assert store.get(s.session_id).in_use  # a look is allowed while a call holds it
    store.checkpoint(held, (state + 1, None, 9))  # what a crash would leave
    assert store.get(s.session_id).position == 9 and store.get(s.session_id).logits is None
    held.state, held.position = state + 2, 10
    store.release(held)
    look = store.get(s.session_id)
    assert (look.position, look.in_use) == (10, False) and np.array_equal(look.state, state + 2)
    store.delete(s.session_id)
    with pytest.raises(SessionNotFound, match="closed or expired"):
        store.acquire(s.session_id)
    with pytest.raises(SessionNotFound):
        store.acquire("../etc/passwd")


def test_durable_sessions_refuse_what_they_must_not_continue(backend):
    store = durable(backend)
    sid = store.create("m", np.zeros((2, 3), np.float32)).session_id
    # another export of the model (a rolling update with new weights): FAILED_PRECONDITION
    with pytest.raises(SessionMismatch, match="another export"):
        DurableSessions(backend, {"m": "c" * 64}).acquire(sid)
    with pytest.raises(SessionMismatch, match="does not serve"):
        DurableSessions(backend, {"x": "c" * 64}).acquire(sid)
    with pytest.raises(SessionCorrupt, match="cannot be read"):  # signed only where a key is set
        durable(backend, key=b"k" * 16).acquire(sid)
    backend.put(sid, b"not a snapshot", 60)
    with pytest.raises(SessionCorrupt, match="cannot be read"):
        store.acquire(sid)
    assert backend.acquire(sid, "probe", 5)  # every refusal gave its lease back


def test_durable_sessions_a_lapsed_lease_loses_the_call(backend):
    store = durable(backend, lease_ttl=0.2)
    sid = store.create("m", np.zeros((2, 3), np.float32)).session_id
    slow = store.acquire(sid)
    time.sleep(0.3)
    fast = store.acquire(sid)  # the lease lapsed: another call may take the session
    fast.position = 3
    store.release(fast)
    slow.position = 99
    with pytest.raises(SessionLost, match="taken over"):
        store.release(slow)
    assert store.get(sid).position == 3  # the late writer changed nothing


def test_durable_sessions_bound_and_expiry(tmp_path):
    evicted = []
    store = durable(
        FileBackend(tmp_path), max_sessions=2, idle_timeout=0.2, on_evict=evicted.append
    )
    for _ in range(2):
        store.create("m", np.zeros((2, 3), np.float32))
    with pytest.raises(TooManySessions, match="maximum of 2"):
        store.create("m", np.zeros((2, 3), np.float32))
    assert len(store) == 2
    time.sleep(0.3)
    assert store.expire() == 2 and evicted == [2] and len(store) == 0


def test_a_redis_that_hangs_costs_one_timeout_then_fails_fast():
    import socket

    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        b = RedisBackend(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", timeout=0.3, backoff=2.0)
        t0 = time.perf_counter()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            b.get("abc")
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(5):  # within the backoff: no more waiting on the silent server
            with pytest.raises(StoreUnavailable, match="unreachable"):
                b.commit("abc", "me", b"x", 60, None)
        assert first >= 0.3 and time.perf_counter() - t0 < 0.1
        b.close()


def test_serve_session_store_flags_and_environment(monkeypatch, tmp_path, capsys):
    from training.cli import build_parser, main

    args = build_parser().parse_args(["serve"])
    assert (args.session_store, args.session_checkpoint_s) == ("memory", 2.0)
    monkeypatch.setenv("NLSTM_SESSION_STORE", f"file:{tmp_path}")
    monkeypatch.setenv("NLSTM_SESSION_CHECKPOINT_S", "0.5")
    args = build_parser().parse_args(["serve"])
    assert (args.session_store, args.session_checkpoint_s) == (f"file:{tmp_path}", 0.5)
    # refused before any model loads (the models folder does not even exist)
    missing = str(tmp_path / "no-models")
    assert main(["serve", "--models", missing, "--session-store", "postgres://db/x"]) == 2
    assert "not a store this server knows; use memory" in capsys.readouterr().err
    assert main(["serve", "--models", missing, "--session-checkpoint-s", "0"]) == 2
    assert (
        "--session-checkpoint-s must be a finite number in [0.05, 600] seconds"
        in capsys.readouterr().err
    )


# ------------------------------------------------------------- owners and per-client bounds
class As:
    """A stand-in for serving.auth.current_caller: whoever `who` is set to is calling."""

    def __init__(self, client="", private=False):
        self.client, self.private = client, private

    def __call__(self):
        return self


def twin(backend):
    """Another client of the same store: as another replica (Redis) or process (file) opens it."""
    return (
        FileBackend(backend.root) if isinstance(backend, FileBackend) else RedisBackend(backend.url)
    )


def test_a_clients_count_is_atomic_shared_and_freed_by_close_and_expiry(backend):
    other = twin(backend)
    try:
        assert backend.put("a1", b"x", 60, "key:a", limit=2) and other.put(
            "a2", b"x", 60, "key:a", limit=2
        )
        assert not backend.put("a3", b"x", 60, "key:a", limit=2) and not other.put(
            "a3", b"x", 60, "key:a", limit=2
        )
        assert backend.get("a3") is None  # refused: nothing written
        assert other.put("b1", b"x", 60, "key:b", limit=2)  # the bound is per client
        assert other.put("a3", b"x", 60, "key:a")  # limit 0: no bound, still counted
        assert (backend.held("key:a"), other.held("key:b"), backend.held("key:c")) == (3, 1, 0)
        assert backend.delete("a3", "key:a") and backend.held("key:a") == 2
        assert other.delete("a2", "key:a")  # closed on the other replica frees the slot here
        assert backend.put("a4", b"x", 60, "key:a", limit=2) and not backend.put(
            "a5", b"x", 60, "key:a", limit=2
        )
        # expiry frees a slot; a write (a call's commit) keeps its session counted past its
        # first ttl
        backend.put("short", b"x", 0.4, "key:e")
        backend.put("kept", b"x", 0.4, "key:e")
        assert backend.acquire("kept", "call", 5)
        time.sleep(0.2)
        assert backend.commit("kept", "call", b"y", 0.8, None, "key:e") == SAVED
        assert not backend.put("e3", b"x", 60, "key:e", limit=2)
        time.sleep(0.35)
        assert backend.held("key:e") == 1 and other.put("e3", b"x", 60, "key:e", limit=2)
        assert not other.put("e4", b"x", 60, "key:e", limit=2)
        time.sleep(0.5)
        backend.expire()
        assert backend.held("key:e") == 1 and backend.put("e4", b"x", 60, "key:e", limit=2)
    finally:
        other.close()


def test_creates_racing_for_the_last_slots_take_only_those(backend):
    import threading

    clients = [twin(backend) for _ in range(8)]
    barrier, won = threading.Barrier(len(clients)), []

    def create(i, b):
        barrier.wait()
        if b.put(f"race{i}", b"x", 60, "key:r", limit=3):
            won.append(i)

    threads = [threading.Thread(target=create, args=(i, b)) for i, b in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for b in clients:
        b.close()
    assert len(won) == 3 and backend.held("key:r") == 3


def test_sessions_belong_to_their_owner_in_a_shared_store(backend):
    caller = As("key:aaaa", private=True)
    store = durable(backend, caller=caller, key=b"k" * 16, max_per_client=2)
    replica = durable(backend, caller=caller, key=b"k" * 16, max_per_client=2)  # another replica
    mine = store.create("m", np.zeros((2, 3), np.float32), position=4)
    assert mine.owner == "key:aaaa" and replica.get(mine.session_id).owner == "key:aaaa"
    caller.client = "key:bbbb"  # another key: as if the id did not exist, on every replica
    for s in (store, replica):
        for op in (s.acquire, s.get, s.delete):
            with pytest.raises(SessionNotFound, match="closed or expired"):
                op(mine.session_id)
    theirs = replica.create("m", np.zeros((2, 3), np.float32))
    held = replica.acquire(theirs.session_id)
    caller.client = "key:aaaa"
    with pytest.raises(
        SessionNotFound
    ):  # not ABORTED: a busy session of another key is not found either
        store.acquire(theirs.session_id)
    caller.client = "key:bbbb"
    replica.release(held)
    caller.client = "key:aaaa"
    held = store.acquire(mine.session_id)
    held.position = 9
    store.release(held)  # a call's write keeps the owner
    assert replica.get(mine.session_id).owner == "key:aaaa" and store.held_by("key:aaaa") == 1
    store.create("m", np.zeros((2, 3), np.float32))
    with pytest.raises(TooManySessions, match="per-client session limit is 2"):
        replica.create("m", np.zeros((2, 3), np.float32))
    store.delete(mine.session_id)
    replica.create("m", np.zeros((2, 3), np.float32))
    # without keys (not private) every caller sees every session; the owner still counts
    open_store = durable(backend, caller=As("peer:ipv4:10.0.0.9"), key=b"k" * 16)
    look = open_store.get(theirs.session_id)
    assert look.owner == "key:bbbb" and look.position == 0


def test_records_without_an_owner_still_load(backend):
    """A session written by a server before owners were recorded is a bare snapshot: it loads,
    with no owner, for servers without keys, and is found by no key."""
    from serving import snapshot
    from serving.durable import RECORD_MAGIC, decode_record, encode_record

    old = snapshot.encode(
        snapshot.SessionState("m", "a" * 64, 5, np.ones((2, 3), np.float32), None)
    )
    backend.put("legacy", old, 60)
    assert (
        durable(backend).get("legacy").owner == "" and durable(backend).get("legacy").position == 5
    )
    with pytest.raises(SessionNotFound):
        durable(backend, caller=As("key:aaaa", private=True)).acquire("legacy")
    held = durable(backend).acquire("legacy")
    durable(backend).release(held)
    assert backend.get("legacy") == old  # an ownerless session is written as it was (main reads it)
    # an owned record: its owner and snapshot bound by a digest (an HMAC under the snapshot key)
    record = encode_record("key:aaaa", old, b"k" * 16)
    assert record.startswith(RECORD_MAGIC) and decode_record(record, b"k" * 16) == ("key:aaaa", old)
    moved = record.replace(b"key:aaaa", b"key:bbbb")
    for bad in (moved, record[:-1], record[:20], record[:8] + b"\x07\x00" + record[10:]):
        with pytest.raises(snapshot.SnapshotInvalid):
            decode_record(bad, b"k" * 16)
    backend.put("moved", moved, 60)
    with pytest.raises(SessionCorrupt, match="cannot be read"):
        durable(backend, key=b"k" * 16).get("moved")
