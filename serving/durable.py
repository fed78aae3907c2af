"""Sessions kept in a file or Redis store (serving/store.py) instead of the process's memory:
what `--session-store file:DIR` and `redis://...` give the engine in place of
serving.sessions.SessionStore, with the same methods (create, acquire, get, release, delete,
expire, len) and the same errors.

A session is stored as a serving.snapshot encoding (signed with the server's snapshot key when
it has one), so a session written by one replica, or before a restart, is read by another with
the same checks as a RestoreSession: the model must be served here, and by the same export.
A call *acquires* a session (takes its lease, then reads it) and *releases* it (writes it and
gives the lease back in one atomic step); a long call `checkpoint`s it meanwhile (writes its
state so far, or only renews the lease and the idle timeout). Between calls nothing of a
session lives in the process: any replica serves the next call.

Every method blocks on the store: the engine runs them on its store thread. StoreUnavailable
passes through (the servicer answers UNAVAILABLE).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass

import numpy as np

from serving import snapshot
from serving.sessions import Session, SessionBusy, SessionError, SessionNotFound, TooManySessions
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


class DurableSessions:
    """Sessions in `backend`, for the models whose export identities `model_ids` gives
    (name -> serving.snapshot.model_identity)."""

    def __init__(self, backend: Backend, model_ids: dict[str, str], *, max_sessions: int = 1024,
                 idle_timeout: float = 600.0, lease_ttl: float = 6.0, key: bytes | None = None,
                 on_evict=None) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if idle_timeout <= 0 or lease_ttl <= 0:
            raise ValueError(f"idle_timeout and lease_ttl must be > 0 seconds, got {idle_timeout}, {lease_ttl}")
        self.backend = backend
        self.model_ids = model_ids
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.lease_ttl = lease_ttl
        self.key = key
        self.evicted = 0
        self._on_evict = on_evict
        self._last_count = 0
        # lease tokens name the replica (for whoever reads Redis) and the call
        self._replica = f"{socket.gethostname()}-{os.getpid()}"

    # ---------------------------------------------------------------- encoding
    def _encode(self, s: Session) -> bytes:
        return snapshot.encode(
            snapshot.SessionState(s.model, self.model_ids[s.model], s.position, s.state, s.logits), self.key)

    def _decode(self, session_id: str, data: bytes, lease: str) -> StoredSession:
        try:
            s = snapshot.decode(data, self.key)
        except snapshot.SnapshotInvalid as exc:
            raise SessionCorrupt(f"session {session_id} in {self.backend.url} cannot be read: {exc}") from None
        if s.model not in self.model_ids:
            raise SessionMismatch(
                f"session {session_id} runs model {s.model!r}, which this server does not serve "
                f"(it serves {sorted(self.model_ids)}); call a replica that serves it"
            )
        try:
            snapshot.check_model(s, s.model, self.model_ids[s.model])
        except snapshot.SnapshotMismatch as exc:
            raise SessionMismatch(
                f"session {session_id}: {exc} (during a rolling update, call a replica still serving "
                "the export that made it)"
            ) from None
        return StoredSession(session_id, s.model, s.state, s.logits, s.position, in_use=bool(lease), lease=lease)

    def _not_found(self, session_id: str) -> SessionNotFound:
        return SessionNotFound(
            f"no session {session_id!r}: it was closed or expired after {self.idle_timeout:g} s idle; "
            "create a new one"
        )

    # ---------------------------------------------------------------- the interface
    def __len__(self) -> int:
        """Sessions in the store (the gauge): the last count when the store does not answer."""
        try:
            self._last_count = self.backend.count()
        except StoreUnavailable:
            pass
        return self._last_count

    def create(self, model: str, state: np.ndarray, logits: np.ndarray | None = None,
               position: int = 0) -> StoredSession:
        if self.backend.count() >= self.max_sessions:
            raise TooManySessions(
                f"the session store holds its maximum of {self.max_sessions} sessions; close unused "
                "sessions (CloseSession) or retry later"
            )
        session = StoredSession(
            secrets.token_urlsafe(16), model, np.asarray(state, np.float32).copy(),
            None if logits is None else np.asarray(logits, np.float32).copy(), position)
        self.backend.put(session.session_id, self._encode(session), self.idle_timeout)
        return session

    def acquire(self, session_id: str) -> StoredSession:
        """Take the session's lease and read it; release() it when the call ends."""
        if not valid_id(session_id):
            raise self._not_found(session_id)
        lease = f"{self._replica}-{secrets.token_hex(8)}"
        if not self.backend.acquire(session_id, lease, self.lease_ttl):
            if self.backend.get(session_id) is None:
                raise self._not_found(session_id)
            raise SessionBusy(
                f"session {session_id} is in use by another call (on this or another replica); calls "
                "on one session must not overlap (wait for the other call to finish)"
            )
        try:
            data = self.backend.get(session_id)
            if data is None:
                raise self._not_found(session_id)
            return self._decode(session_id, data, lease)
        except BaseException:
            try:
                self.backend.release(session_id, lease)
            except StoreUnavailable:
                pass  # the lease lapses by itself
            raise

    def get(self, session_id: str) -> StoredSession:
        """The session as last written, for a look only (it may be in use by a call)."""
        data, held = self.backend.peek(session_id)
        if data is None:
            raise self._not_found(session_id)
        session = self._decode(session_id, data, "")
        session.in_use = held
        return session

    def release(self, session: StoredSession) -> None:
        """Write the session (as the call leaves it) and give its lease back, atomically."""
        self._commit(session, self._encode(session), None)
        session.in_use = False

    def checkpoint(self, session: StoredSession, keep: tuple[np.ndarray, np.ndarray | None, int] | None) -> None:
        """During a call: write `keep` (state, logits, position: what the session would hold if
        the call ended now) and renew the lease; None renews without writing."""
        data = None
        if keep is not None:
            state, logits, position = keep
            data = snapshot.encode(snapshot.SessionState(session.model, self.model_ids[session.model], position,
                                                         state, logits), self.key)
        self._commit(session, data, self.lease_ttl)

    def _commit(self, session: StoredSession, data: bytes | None, lease_ttl: float | None) -> None:
        result = self.backend.commit(session.session_id, session.lease, data, self.idle_timeout, lease_ttl)
        if result == LEASE_LOST:
            raise SessionLost(
                f"session {session.session_id} was taken over by another call: this server did not renew "
                f"its lease within {self.lease_ttl:g} s, so what this call did was not kept; GetSession "
                "tells where the session is"
            )
        if result == GONE:  # closed (CloseSession) or expired while the call ran: nothing to keep
            log.info("session %s was closed while a call ran on it; its result was dropped", session.session_id)

    def delete(self, session_id: str) -> None:
        if not self.backend.delete(session_id):
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
