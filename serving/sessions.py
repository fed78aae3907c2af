"""The session store: each session is one sequence's recurrent state, kept between calls.

A session holds its model's name and a (S, H) float32 state (the exported step graph's state
rows: every layer's h, its outer and inner memories, an HM-LSTM's boundaries). Ids carry 128
random bits. Sessions expire after `idle_timeout` seconds without use and are bounded in
number; a session in use by one call is not handed to another: the second call gets
SessionBusy (the servicer answers ABORTED), so two calls can never interleave their steps on
one state. A call writes the state back when it ends (serving/engine.py decides which state:
the rules for calls that do not complete are in the .proto's header).

Each session records its `owner`: the client that created it (serving.auth.Caller.client: an
API key's fingerprint, or the peer's address when the server has no keys). With API keys
(`private`), a session is found only by calls of its owner: another key gets the same
SessionNotFound as for an id that does not exist, so ids of other clients' sessions cannot
be confirmed. `max_per_client` bounds the sessions one owner holds.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np


def new_session_id() -> str:
    """A new session id: 128 random bits, base64url (22 characters), never starting with "-" (a
    command line would read such an id as an option: `nlstm score --session -x...`)."""
    while True:
        sid = secrets.token_urlsafe(16)
        if not sid.startswith("-"):
            return sid


class SessionError(Exception):
    """Base of the store's errors; each maps to one gRPC status code in the servicer."""


class SessionNotFound(SessionError):
    pass


class SessionBusy(SessionError):
    pass


class TooManySessions(SessionError):
    pass


class _Anonymous:
    client = ""
    private = False


def _anonymous():
    return _Anonymous


@dataclass
class Session:
    session_id: str
    model: str
    state: np.ndarray  # (S, H) float32: after the last symbol fed
    logits: np.ndarray | None = None  # what that step predicts next; None: nothing fed yet
    position: int = 0  # characters (or glimpses) the state has taken in since creation
    last_used: float = field(default_factory=time.monotonic)
    in_use: bool = False
    owner: str = ""  # the client that created it (see the module's docstring)


class SessionStore:
    """Thread-safe map of session id -> Session with idle expiry and a size bound."""

    def __init__(
        self,
        max_sessions: int = 1024,
        idle_timeout: float = 600.0,
        clock=time.monotonic,
        on_evict=None,
        max_per_client: int = 0,
        caller=_anonymous,
    ):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {idle_timeout}")
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.evicted = 0  # sessions expired by idleness, for the metrics
        # called with the number of sessions each expiry dropped: whether by expire(), by
        # create() making room, or by a call that found its session expired
        self._on_evict = on_evict
        # caller() -> who is calling (read on the calling thread: .client, and .private when
        # sessions belong to their creator); max_per_client: sessions per client, 0: no bound
        self._caller = caller
        self.max_per_client = max_per_client
        self._per_client: dict[str, int] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def create(
        self, model: str, state: np.ndarray, logits: np.ndarray | None = None, position: int = 0
    ) -> Session:
        """A new session holding (copies of) `state` and `logits` (a restore or a fork: at
        `position`; a fresh session: the initial state, nothing fed)."""
        owner = self._caller().client
        with self._lock:
            self._expire_locked()
            if len(self._sessions) >= self.max_sessions:
                raise TooManySessions(
                    f"the server holds its maximum of {self.max_sessions} sessions; close unused "
                    "sessions (CloseSession) or retry later"
                )
            if self.max_per_client and self._per_client.get(owner, 0) >= self.max_per_client:
                raise TooManySessions(
                    f"this client holds {self._per_client[owner]} sessions: the server's "
                    f"per-client session limit is {self.max_per_client}; close unused sessions "
                    "(CloseSession) "
                    "or wait for them to expire"
                )
            sid = new_session_id()
            session = Session(
                sid,
                model,
                state.astype(np.float32, copy=True),
                None if logits is None else logits.astype(np.float32, copy=True),
                position,
                last_used=self._clock(),
                owner=owner,
            )
            self._sessions[sid] = session
            self._per_client[owner] = self._per_client.get(owner, 0) + 1
            return session

    def held_by(self, client: str) -> int:
        """Sessions `client` holds."""
        with self._lock:
            return self._per_client.get(client, 0)

    def acquire(self, session_id: str) -> Session:
        """Take a session for one call; release() it when the call ends."""
        with self._lock:
            session = self._get_locked(session_id)
            if session.in_use:
                raise SessionBusy(
                    f"session {session_id} is in use by another call; calls on one session must "
                    "not overlap (wait for the other call to finish)"
                )
            session.in_use = True
            return session

    def get(self, session_id: str) -> Session:
        """The session, for a look only (GetSession): it may be in use by a call."""
        with self._lock:
            return self._get_locked(session_id)

    def release(self, session: Session) -> None:
        with self._lock:
            session.in_use = False
            session.last_used = self._clock()

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._get_locked(session_id)
            self._drop_locked(session_id)

    def expire(self) -> int:
        """Drop sessions idle longer than idle_timeout; returns how many went."""
        with self._lock:
            return self._expire_locked()

    def _get_locked(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is not None:
            caller = self._caller()
            if caller.private and session.owner != caller.client:
                session = None  # another key's session: answered exactly as an unknown id
            elif not session.in_use and self._idle(session):
                self._drop_locked(session_id)
                self._evicted(1)
                session = None
        if session is None:
            raise SessionNotFound(
                f"no session {session_id!r}: it was closed, expired after "
                f"{self.idle_timeout:g} s idle, or belongs to another server; create a new one"
            )
        return session

    def _idle(self, session: Session) -> bool:
        return self._clock() - session.last_used > self.idle_timeout

    def _expire_locked(self) -> int:
        stale = [sid for sid, s in self._sessions.items() if not s.in_use and self._idle(s)]
        for sid in stale:
            self._drop_locked(sid)
        if stale:
            self._evicted(len(stale))
        return len(stale)

    def _drop_locked(self, session_id: str) -> None:
        owner = self._sessions.pop(session_id).owner
        left = self._per_client[owner] - 1
        if left:
            self._per_client[owner] = left
        else:
            del self._per_client[owner]  # the map holds only clients that hold sessions

    def _evicted(self, n: int) -> None:
        self.evicted += n
        if self._on_evict is not None:
            self._on_evict(n)
