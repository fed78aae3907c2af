"""Sessions kept in a file or Redis store (serving/store.py) instead of the process's memory:
what `--session-store file:DIR` and `redis://...` give the engine in place of
serving.sessions.SessionStore, with the same methods (create, acquire, get, release, delete,
expire, len) and the same errors.

A session is stored as a *record*: the client that owns it (below) and a serving.snapshot
encoding of its state (signed with the server's snapshot key when it has one), so a session
written by one replica, or before a restart, is read by another with the same checks as a
RestoreSession: the model must be served here, and by the same export.

Owners, as in serving/sessions.py: a session belongs to the client that created it
(serving.auth.Caller.client: an API key's fingerprint, never the key; the peer's address
without keys; "" without either). With API keys a session is found only by calls of its owner,
on every replica and after a restart: another key gets the same SessionNotFound as for an id
that does not exist. `max_per_client` bounds the sessions one client holds over every replica
sharing the store (the backend counts them, serving/store.py). A record without an owner (one
written before owners were recorded, or by a server whose calls name no client) is visible to
every caller of a server without keys and to no caller of a server with keys.

Record layout, version 1 (little-endian):

    offset  size  field
    0       8     magic b"NLSTMSR\0"
    8       2     record version (uint16) = RECORD_VERSION
    10      2     owner length K (uint16), at most MAX_OWNER
    12      K     owner, UTF-8
    12+K    ...   the session: a serving.snapshot encoding
    ...     32    SHA-256 of every byte above, or its HMAC-SHA256 under the snapshot key: the
                  owner cannot be changed, nor a session moved to another owner, without it

A session without an owner is written as the bare snapshot ("version 0": what servers before
records wrote, and what they still read, so a rolling update from one without owners loses no
session), and a bare snapshot is read as a session without an owner.

A call *acquires* a session (takes its lease, then reads it) and *releases* it (writes it and
gives the lease back in one atomic step); a long call `checkpoint`s it meanwhile (writes its
state so far, or only renews the lease and the idle timeout). Between calls nothing of a
session lives in the process: any replica serves the next call.

Every method blocks on the store: the engine runs them on its store thread. StoreUnavailable
passes through (the servicer answers UNAVAILABLE).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import socket
import struct
from dataclasses import dataclass

import numpy as np

from serving import snapshot
from serving.sessions import (
    Session,
    SessionBusy,
    SessionError,
    SessionNotFound,
    TooManySessions,
    _anonymous,
    new_session_id,
)
from serving.store import GONE, LEASE_LOST, Backend, StoreUnavailable, valid_id

log = logging.getLogger("nlstm.serving")


class SessionLost(SessionError):
    """The call's lease lapsed and another call took the session (ABORTED)."""


class SessionMismatch(SessionError):
    """A stored session of a model this replica does not serve, or of another export of it
    (FAILED_PRECONDITION: mid rolling deploy, another replica still serves it)."""


class SessionCorrupt(SessionError):
    """Stored bytes that do not decode (DATA_LOSS)."""


@dataclass
class StoredSession(Session):
    lease: str = ""  # the token of the call holding it (empty when only looked at)


RECORD_MAGIC = b"NLSTMSR\0"
RECORD_VERSION = 1
MAX_OWNER = 1024  # bytes: a key's client id is 20, a peer's address at most ~60
_RECORD = struct.Struct("<8sHH")  # magic, version, owner length


def encode_record(owner: str, snap: bytes, key: bytes | None = None) -> bytes:
    """The stored record of a session owned by `owner` whose snapshot bytes are `snap`."""
    if not owner:
        return snap  # version 0: the bare snapshot
    name = owner.encode()
    if len(name) > MAX_OWNER:
        raise ValueError(f"an owner is at most {MAX_OWNER} bytes, got {len(name)}")
    body = _RECORD.pack(RECORD_MAGIC, RECORD_VERSION, len(name)) + name + snap
    return body + _digest(body, key)


def decode_record(data: bytes, key: bytes | None = None) -> tuple[str, bytes]:
    """(owner, snapshot bytes) of a stored record; "" for a bare snapshot. The snapshot is not
    checked here (serving.snapshot.decode does); snapshot.SnapshotInvalid when the record is
    not one."""
    if not data.startswith(RECORD_MAGIC):
        return "", data
    if len(data) < _RECORD.size + hashlib.sha256().digest_size:
        raise snapshot.SnapshotInvalid(f"session record is truncated: {len(data)} bytes")
    _, version, n = _RECORD.unpack_from(data)
    if version != RECORD_VERSION:
        raise snapshot.SnapshotInvalid(
            f"session record version {version} is not readable here; "
            f"this server reads {RECORD_VERSION}"
        )
    body, digest = data[:-32], data[-32:]
    if not hmac.compare_digest(digest, _digest(body, key)):
        raise snapshot.SnapshotInvalid(
            "session record does not verify (its digest"
            + (", an HMAC under the snapshot key," if key else "")
            + " does not match): changed or truncated"
        )
    if _RECORD.size + n > len(body):
        raise snapshot.SnapshotInvalid(f"session record owner length {n} runs past the data")
    try:
        owner = body[_RECORD.size : _RECORD.size + n].decode()
    except UnicodeDecodeError:
        raise snapshot.SnapshotInvalid("session record owner is not UTF-8") from None
    return owner, body[_RECORD.size + n :]


def record_owner(data: bytes) -> str:
    """The owner a record names, unverified: to answer a caller that is not its owner without
    reading further (the record is verified when the session is read)."""
    if not data.startswith(RECORD_MAGIC) or len(data) < _RECORD.size:
        return ""
    n = _RECORD.unpack_from(data)[2]
    return data[_RECORD.size : _RECORD.size + n].decode(errors="replace")


def _digest(body: bytes, key: bytes | None) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest() if key else hashlib.sha256(body).digest()


class DurableSessions:
    """Sessions in `backend`, for the models whose export identities `model_ids` gives
    (name -> serving.snapshot.model_identity). `caller` and `max_per_client` as for
    serving.sessions.SessionStore."""

    def __init__(
        self,
        backend: Backend,
        model_ids: dict[str, str],
        *,
        max_sessions: int = 1024,
        idle_timeout: float = 600.0,
        lease_ttl: float = 6.0,
        key: bytes | None = None,
        on_evict=None,
        max_per_client: int = 0,
        caller=_anonymous,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if idle_timeout <= 0 or lease_ttl <= 0:
            raise ValueError(
                f"idle_timeout and lease_ttl must be > 0 seconds, got {idle_timeout}, {lease_ttl}"
            )
        self.backend = backend
        self.model_ids = model_ids
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.lease_ttl = lease_ttl
        self.key = key
        self.max_per_client = max_per_client
        self._caller = caller
        self.evicted = 0
        self._on_evict = on_evict
        self._last_count = 0
        # lease tokens name the replica (for whoever reads Redis) and the call
        self._replica = f"{socket.gethostname()}-{os.getpid()}"

    # ---------------------------------------------------------------- encoding
    def _encode(self, s: Session, state=None, logits=None, position=None) -> bytes:
        """The record of `s`, or of its owner with the state, logits and position given."""
        if state is None:
            state, logits, position = s.state, s.logits, s.position
        snap = snapshot.encode(
            snapshot.SessionState(s.model, self.model_ids[s.model], position, state, logits),
            self.key,
        )
        return encode_record(s.owner, snap, self.key)

    def _decode(self, session_id: str, data: bytes, lease: str) -> StoredSession:
        try:
            owner, snap = decode_record(data, self.key)
            s = snapshot.decode(snap, self.key)
        except snapshot.SnapshotInvalid as exc:
            raise SessionCorrupt(
                f"session {session_id} in {self.backend.url} cannot be read: {exc}"
            ) from None
        if s.model not in self.model_ids:
            raise SessionMismatch(
                f"session {session_id} runs model {s.model!r}, which this server does not serve "
                f"(it serves {sorted(self.model_ids)}); call a replica that serves it"
            )
        try:
            snapshot.check_model(s, s.model, self.model_ids[s.model])
        except snapshot.SnapshotMismatch as exc:
            raise SessionMismatch(
                f"session {session_id}: {exc} (during a rolling update, call a replica "
                "still serving the export that made it)"
            ) from None
        return StoredSession(
            session_id,
            s.model,
            s.state,
            s.logits,
            s.position,
            in_use=bool(lease),
            owner=owner,
            lease=lease,
        )

    def _not_found(self, session_id: str) -> SessionNotFound:
        # the same for an id that never existed and for another key's session
        return SessionNotFound(
            f"no session {session_id!r}: it was closed or expired after "
            f"{self.idle_timeout:g} s idle; create a new one"
        )

    def _hidden(self, owner: str) -> bool:
        """Whether the running call may not see a session of `owner` (another key's)."""
        caller = self._caller()
        return caller.private and owner != caller.client

    # ---------------------------------------------------------------- the interface
    def __len__(self) -> int:
        """Sessions in the store (the gauge): the last count when the store does not answer."""
        with contextlib.suppress(StoreUnavailable):
            self._last_count = self.backend.count()
        return self._last_count

    def create(
        self, model: str, state: np.ndarray, logits: np.ndarray | None = None, position: int = 0
    ) -> StoredSession:
        if self.backend.count() >= self.max_sessions:
            raise TooManySessions(
                f"the session store holds its maximum of {self.max_sessions} sessions; "
                "close unused sessions (CloseSession) or retry later"
            )
        owner = self._caller().client
        session = StoredSession(
            new_session_id(),
            model,
            np.asarray(state, np.float32).copy(),
            None if logits is None else np.asarray(logits, np.float32).copy(),
            position,
            owner=owner,
        )
        if not self.backend.put(
            session.session_id, self._encode(session), self.idle_timeout, owner, self.max_per_client
        ):
            raise TooManySessions(
                f"this client holds {self.max_per_client} sessions: the server's per-client "
                f"session limit is {self.max_per_client} (over every replica sharing the "
                "session store); close unused sessions (CloseSession) or wait for them to expire"
            )
        return session

    def held_by(self, client: str) -> int:
        """Sessions `client` holds (in the whole store)."""
        return self.backend.held(client)

    def acquire(self, session_id: str) -> StoredSession:
        """Take the session's lease and read it; release() it when the call ends."""
        if not valid_id(session_id):
            raise self._not_found(session_id)
        if self._caller().private:
            # another key's session is not even leased: its owner's calls never see ABORTED for it
            data = self.backend.get(session_id)
            if data is None or self._hidden(record_owner(data)):
                raise self._not_found(session_id)
        lease = f"{self._replica}-{secrets.token_hex(8)}"
        if not self.backend.acquire(session_id, lease, self.lease_ttl):
            data = self.backend.get(session_id)
            if data is None or self._hidden(record_owner(data)):
                raise self._not_found(session_id)
            raise SessionBusy(
                f"session {session_id} is in use by another call (on this or another "
                "replica); calls on one session must not overlap (wait for the other call "
                "to finish)"
            )
        try:
            data = self.backend.get(session_id)
            if data is None:
                raise self._not_found(session_id)
            session = self._decode(session_id, data, lease)
            if self._hidden(session.owner):
                raise self._not_found(session_id)
            return session
        except BaseException:
            with contextlib.suppress(StoreUnavailable):  # the lease lapses by itself
                self.backend.release(session_id, lease)
            raise

    def get(self, session_id: str) -> StoredSession:
        """The session as last written, for a look only (it may be in use by a call)."""
        data, held = self.backend.peek(session_id)
        if data is None or self._hidden(record_owner(data)):
            raise self._not_found(session_id)
        session = self._decode(session_id, data, "")
        if self._hidden(session.owner):
            raise self._not_found(session_id)
        session.in_use = held
        return session

    def release(self, session: StoredSession) -> None:
        """Write the session (as the call leaves it) and give its lease back, atomically."""
        self._commit(session, self._encode(session), None)
        session.in_use = False

    def checkpoint(
        self, session: StoredSession, keep: tuple[np.ndarray, np.ndarray | None, int] | None
    ) -> None:
        """During a call: write `keep` (state, logits, position: what the session would hold if
        the call ended now) and renew the lease; None renews without writing."""
        data = None if keep is None else self._encode(session, *keep)
        self._commit(session, data, self.lease_ttl)

    def _commit(self, session: StoredSession, data: bytes | None, lease_ttl: float | None) -> None:
        result = self.backend.commit(
            session.session_id, session.lease, data, self.idle_timeout, lease_ttl, session.owner
        )
        if result == LEASE_LOST:
            raise SessionLost(
                f"session {session.session_id} was taken over by another call: this server "
                f"did not renew its lease within {self.lease_ttl:g} s, so what this call did "
                "was not kept; GetSession tells where the session is"
            )
        if result == GONE:  # closed (CloseSession) or expired while the call ran: nothing to keep
            log.info(
                "session %s was closed while a call ran on it; its result was dropped",
                session.session_id,
            )

    def delete(self, session_id: str) -> None:
        # read first: the owner's count loses the session, and another key's is not found
        data = self.backend.get(session_id)
        if (
            data is None
            or self._hidden(owner := record_owner(data))
            or not self.backend.delete(session_id, owner)
        ):
            raise self._not_found(session_id)

    def expire(self) -> int:
        n = self.backend.expire()
        if n:
            self.evicted += n
            if self._on_evict is not None:
                self._on_evict(n)
        return n

    def close(self) -> None:
        self.backend.close()
