"""Session store backends: where a session's bytes live when they must outlive the process or
be shared by replicas (`nlstm serve --session-store URL`).

A backend keeps, per session id, one blob (a serving.snapshot encoding of the session) with
an expiry (the idle timeout), and one *lease*: the token of the call that holds the session,
with its own short expiry. The lease is what keeps the one-call-at-a-time rule across
replicas: a call takes it before it reads the session and gives it back after its last write;
a replica that dies mid-call stops renewing it, and it lapses after `lease_ttl` seconds, so
another replica can serve the session from its last write. Every write made during a call
(`commit`) is conditional on still holding the lease and on the session still existing, so a
replica that lost its lease (paused past the lease's expiry) or a call on a session closed
meanwhile never overwrites or resurrects anything.

Each session is also counted for its *client* (serving.auth.Caller.client: an API key's
fingerprint, a peer's address, or "" without either), so that --max-sessions-per-client holds
for every replica sharing the store and across restarts: `put` refuses, in one atomic step with
the count, a session over the client's `limit`. The count is derived from the sessions that
exist, never kept as a number that a dead replica or an expiry could leave wrong.

    file:DIR               one host: a file per session (written atomically, expiry recorded
                           as the file's mtime), leases in files under an flock; survives a
                           restart on the same DIR
    redis://HOST:PORT/DB   a Redis server shared by replicas (serving/store_redis.py): Redis's
                           own key expiry is the idle timeout, the lease is a key set with SET
                           NX PX and renewed or released by compare-and-set Lua scripts

(`memory`, the default, is not a backend: serving/sessions.py keeps sessions as objects in
the process, without encoding them, as before there were stores.)

Every method may raise StoreUnavailable (Redis unreachable, a file system error); the server
answers UNAVAILABLE for calls that need a session and keeps serving the others. Methods block
on I/O: the engine calls them from its store thread, never from the scheduler's hot loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
import time
from pathlib import Path

from serving.files import atomic_path, atomic_write_text, remove_stale_temporaries

# Session ids are serving.sessions.new_session_id()'s; anything else a client sends is no
# session (and must never become a path or a key pattern).
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")

# commit() outcomes
SAVED, LEASE_LOST, GONE = 1, 0, -1


class StoreUnavailable(Exception):
    """The session store cannot be reached or did not answer (the servicer answers UNAVAILABLE)."""


def valid_id(session_id: str) -> bool:
    return bool(_SESSION_ID.fullmatch(session_id))


class Backend:
    """The store's interface. `ttl` and `lease_ttl` are seconds; `owner` is a lease token;
    `client` the session's owner (the caller that created it), whose sessions are counted."""

    url: str  # for messages and logs (a Redis password is masked)

    def get(self, sid: str) -> bytes | None:
        """The session's bytes, or None when it does not exist or has expired."""
        raise NotImplementedError

    def put(self, sid: str, data: bytes, ttl: float, client: str = "", limit: int = 0) -> bool:
        """Write a new session of `client` (no lease needed: nobody else knows its id yet).
        With `limit` > 0, atomically with the count: when `client` holds `limit` unexpired
        sessions already, write nothing and return False."""
        raise NotImplementedError

    def held(self, client: str) -> int:
        """The unexpired sessions `client` holds."""
        raise NotImplementedError

    def peek(self, sid: str) -> tuple[bytes | None, bool]:
        """(the session's bytes or None, whether a call holds its lease), for a look only."""
        raise NotImplementedError

    def commit(
        self,
        sid: str,
        owner: str,
        data: bytes | None,
        ttl: float,
        lease_ttl: float | None,
        client: str = "",
    ) -> int:
        """For the call holding the lease (`owner`), atomically: write `data` (None: keep the
        stored bytes) with a new expiry of `ttl` seconds, then renew the lease for `lease_ttl`
        seconds (None: give it back). SAVED; LEASE_LOST when `owner` no longer holds the lease;
        GONE when the session was closed or expired (nothing is written in either case).
        `client`: the session's, whose count follows the new expiry."""
        raise NotImplementedError

    def acquire(self, sid: str, owner: str, lease_ttl: float) -> bool:
        """Take the lease; False when another call holds it."""
        raise NotImplementedError

    def release(self, sid: str, owner: str) -> bool:
        """Give the lease back if `owner` still holds it."""
        raise NotImplementedError

    def delete(self, sid: str, client: str = "") -> bool:
        """Remove the session (of `client`) and its lease; False when there was no session."""
        raise NotImplementedError

    def count(self) -> int:
        """Sessions stored (for the active-sessions gauge and --max-sessions)."""
        raise NotImplementedError

    def expire(self) -> int:
        """Remove expired sessions and lapsed leases; how many sessions went (0 where the
        store expires them itself)."""
        return 0

    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def open_backend(url: str) -> Backend | None:
    """The backend for a --session-store URL; None for `memory` (sessions in the process)."""
    if url in ("", "memory"):
        return None
    if url.startswith("file:"):
        path = url.removeprefix("file:").removeprefix("//")  # file:/srv/s or file:///srv/s
        if not path:
            raise ValueError(
                "--session-store file:DIR needs a directory, e.g. file:/var/lib/nlstm/sessions"
            )
        return FileBackend(path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from serving.store_redis import RedisBackend  # the redis client only where it is used

        return RedisBackend(url)
    raise ValueError(
        f"--session-store {url!r} is not a store this server knows; use memory (the default), "
        "file:DIR or redis://HOST:PORT/DB (rediss:// for TLS)"
    )


# ------------------------------------------------------------------------------------ files
class FileBackend(Backend):
    """Sessions as files under DIR/sessions (one per id, replaced atomically by serving/files.py:
    a temporary file, fsynced, renamed, the folder fsynced), their expiry as the file's mtime
    (the deadline, in wall-clock time, so it survives a restart); leases as files under
    DIR/leases holding "owner deadline" (replaced atomically too, not fsynced); for each client a
    folder DIR/owners/HASH (the first 32 hex digits of the client's SHA-256) with an empty file
    per session id: the client's sessions are those of its ids whose session file has not
    expired (counted, and the others' files removed, under the lock).

    Lease changes and conditional writes hold an exclusive flock on DIR/.lock (and a thread
    lock, since flock does not exclude threads sharing one open file), so several processes on
    one host may share DIR; reads take no lock (a rename is atomic). Not for network file
    systems whose flock is advisory-only across hosts: use Redis to share sessions between
    machines."""

    def __init__(self, directory: str | os.PathLike, clock=time.time) -> None:
        self.root = Path(directory)
        self.url = f"file:{self.root}"
        self._clock = clock
        self._sessions, self._leases = self.root / "sessions", self.root / "leases"
        self._owners = self.root / "owners"
        try:
            self._sessions.mkdir(parents=True, exist_ok=True)
            self._leases.mkdir(exist_ok=True)
            self._owners.mkdir(exist_ok=True)
            self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ValueError(
                f"--session-store {self.url}: cannot use {self.root} ({exc.strerror})"
            ) from None
        self._tlock = threading.Lock()
        # leftovers of writes a killed process did not finish: never read, safe to remove
        for folder in (self._sessions, self._leases):
            with contextlib.suppress(OSError):
                # serving/files.py's temporaries, `.{name}.XXXXXXXX.tmp`, by their targets' names
                names = [p.name[1:-13] for p in folder.glob(".*.tmp")]
                remove_stale_temporaries(folder, names)
        for tmp in self._sessions.glob("*.tmp-*"):  # those of versions with their own writer
            with contextlib.suppress(OSError):
                tmp.unlink()

    @contextlib.contextmanager
    def _locked(self):
        with self._tlock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _path(self, sid: str) -> Path | None:
        return self._sessions / f"{sid}.snap" if valid_id(sid) else None

    def _unavailable(self, exc: OSError) -> StoreUnavailable:
        return StoreUnavailable(f"the session store {self.url} failed: {exc.strerror or exc}")

    def _alive(self, path: Path) -> bool:
        try:
            return path.stat().st_mtime > self._clock()
        except FileNotFoundError:
            return False

    def get(self, sid: str) -> bytes | None:
        path = self._path(sid)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_mtime <= self._clock():
                    return None  # expired: expire() removes it
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._unavailable(exc) from None

    def _write(self, path: Path, data: bytes, ttl: float) -> None:
        try:
            with atomic_path(path) as tmp:  # removed on an error, renamed over `path` otherwise
                tmp.write_bytes(data)
                deadline = self._clock() + ttl
                # the expiry travels with the file, set before the rename: a reader never sees
                # the new file with a write time for an mtime (it would read as expired)
                os.utime(tmp, (deadline, deadline))
        except OSError as exc:
            raise self._unavailable(exc) from None

    def put(self, sid: str, data: bytes, ttl: float, client: str = "", limit: int = 0) -> bool:
        path = self._path(sid)
        if path is None:
            raise ValueError(f"not a session id: {sid!r}")
        try:
            with self._locked():
                if limit and self._held(client) >= limit:
                    return False
                self._write(path, data, ttl)
                mine = self._owner_dir(client)
                mine.mkdir(exist_ok=True)
                (mine / sid).touch()
                return True
        except OSError as exc:
            raise self._unavailable(exc) from None

    def _owner_dir(self, client: str) -> Path:
        return self._owners / hashlib.sha256(client.encode()).hexdigest()[:32]

    def _held(self, client: str) -> int:
        """Under the lock: `client`'s unexpired sessions (the ids of the others are removed)."""
        n = 0
        try:
            entries = list(os.scandir(self._owner_dir(client)))
        except FileNotFoundError:
            return 0
        for e in entries:
            path = self._path(e.name)
            if path is not None and self._alive(path):
                n += 1
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
        return n

    def held(self, client: str) -> int:
        try:
            with self._locked():
                return self._held(client)
        except OSError as exc:
            raise self._unavailable(exc) from None

    def _lease(self, sid: str) -> tuple[str, float] | None:
        """(owner, deadline) of a lease that has not lapsed, under the lock."""
        try:
            owner, text = (self._leases / sid).read_text().split()
            deadline = float(text)
        except (FileNotFoundError, ValueError):  # none, or a torn write of a killed process
            return None
        return (owner, deadline) if deadline > self._clock() else None

    def _set_lease(self, sid: str, owner: str, lease_ttl: float) -> None:
        # not fsynced: a lease means nothing once its holder is gone, and a machine crash takes
        # its holders with it (an empty or missing lease file reads as no lease)
        atomic_write_text(
            self._leases / sid, f"{owner} {self._clock() + lease_ttl!r}", durable=False
        )

    def _holds(self, sid: str, owner: str) -> int:
        path = self._path(sid)
        lease = self._lease(sid)
        if lease is None or lease[0] != owner:
            return LEASE_LOST
        return SAVED if path is not None and self._alive(path) else GONE

    def peek(self, sid: str) -> tuple[bytes | None, bool]:
        data = self.get(sid)
        if data is None:
            return None, False
        try:
            with self._locked():
                return data, self._lease(sid) is not None
        except OSError as exc:
            raise self._unavailable(exc) from None

    def commit(self, sid, owner, data, ttl, lease_ttl, client="") -> int:
        # (a client's count reads the session file's expiry itself: nothing to move)
        path = self._path(sid)
        if path is None:  # not a session id
            return GONE
        try:
            with self._locked():
                held = self._holds(sid, owner)
                if held != SAVED:
                    return held
                if data is not None:
                    self._write(path, data, ttl)
                else:
                    deadline = self._clock() + ttl
                    os.utime(path, (deadline, deadline))
                if lease_ttl is None:
                    (self._leases / sid).unlink()
                else:
                    self._set_lease(sid, owner, lease_ttl)
                return SAVED
        except OSError as exc:
            raise self._unavailable(exc) from None

    def acquire(self, sid, owner, lease_ttl) -> bool:
        if not valid_id(sid):
            return True  # nothing to hold: get() finds no session
        try:
            with self._locked():
                if self._lease(sid) is not None:
                    return False
                self._set_lease(sid, owner, lease_ttl)
                return True
        except OSError as exc:
            raise self._unavailable(exc) from None

    def release(self, sid, owner) -> bool:
        if not valid_id(sid):
            return False
        try:
            with self._locked():
                lease = self._lease(sid)
                if lease is None or lease[0] != owner:
                    return False
                (self._leases / sid).unlink()
                return True
        except OSError as exc:
            raise self._unavailable(exc) from None

    def delete(self, sid, client="") -> bool:
        path = self._path(sid)
        if path is None:
            return False
        try:
            with self._locked():
                alive = self._alive(path)
                for gone in (path, self._leases / sid, self._owner_dir(client) / sid):
                    with contextlib.suppress(FileNotFoundError):
                        gone.unlink()
                return alive
        except OSError as exc:
            raise self._unavailable(exc) from None

    def count(self) -> int:
        try:
            now = self._clock()
            n = 0
            with os.scandir(self._sessions) as it:
                for e in it:
                    if e.name.endswith(".snap"):
                        with contextlib.suppress(FileNotFoundError):
                            n += e.stat().st_mtime > now
            return n
        except OSError as exc:
            raise self._unavailable(exc) from None

    def expire(self) -> int:
        gone = 0
        try:
            with self._locked():
                now = self._clock()
                for path in self._sessions.glob("*.snap"):
                    try:
                        if path.stat().st_mtime <= now:
                            path.unlink()
                            gone += 1
                    except FileNotFoundError:
                        pass
                for lease in self._leases.iterdir():
                    if not lease.name.startswith(".") and self._lease(lease.name) is None:
                        with contextlib.suppress(FileNotFoundError):
                            lease.unlink()
                for mine in self._owners.iterdir():  # the ids of sessions gone, then empty folders
                    for marker in mine.iterdir():
                        snap = self._path(marker.name)
                        if snap is None or not self._alive(snap):
                            with contextlib.suppress(FileNotFoundError):
                                marker.unlink()
                    with contextlib.suppress(OSError):  # not empty: the client holds sessions
                        mine.rmdir()
        except OSError as exc:
            raise self._unavailable(exc) from None
        return gone

    def ping(self) -> None:
        if not os.access(self._sessions, os.W_OK):
            raise StoreUnavailable(f"the session store {self.url} is not writable")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


__all__ = [
    "GONE",
    "LEASE_LOST",
    "SAVED",
    "Backend",
    "FileBackend",
    "StoreUnavailable",
    "open_backend",
    "valid_id",
]
