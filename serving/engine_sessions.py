"""The session half of the serving engine (serving/engine.py's Engine inherits it): where
sessions live, and how each call takes, checkpoints and gives back the one it names.

Sessions live in the process (SessionStore, `--session-store memory`) or in a shared store
(serving/durable.py over serving/store.py: `file:DIR`, `redis://...`). With a shared store a
call reads its session when it starts and writes it when it ends, on the store thread (never
on the event loop, never per character on the scheduler's); while it runs, a checkpoint task
writes what the session would keep if the call ended now (Generate: the prompt and the
messages sent; glimpses: those answered) and renews the call's lease every
`checkpoint_interval` seconds, so that a replica that dies loses at most that much.

Here too: the session rpcs (create, get, close, snapshot, restore, fork; snapshots are
serving/snapshot.py's), the store's failures turned into the domain's errors
(serving/errors.py), and `_open` / `_track` / `_finish`, which every call of the engine goes
through: `_finish` is where each call commits what its session keeps.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from serving import snapshot
from serving.auth import current_caller
from serving.calls import Call, Keep
from serving.durable import DurableSessions, SessionCorrupt, SessionLost, SessionMismatch
from serving.errors import (
    Aborted,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from serving.limits import Limits
from serving.metrics import Metrics
from serving.scheduler import Scheduler, Sequence
from serving.sessions import Session, SessionBusy, SessionNotFound, SessionStore, TooManySessions
from serving.store import Backend, StoreUnavailable, open_backend

if TYPE_CHECKING:
    from serving.engine import ServedModel

log = logging.getLogger("nlstm.serving")

# The shortest lease on a session in a shared store: a lease that lapses while its call still
# runs (an event loop held up on a loaded machine) loses that call's result, so even frequent
# checkpoints get a lease that outlives a stall of a second or two.
LEASE_MIN = 2.0
# The largest position RestoreSession accepts: a session's position is a uint64 on the wire,
# and one restored nearer its end than this would overflow it (every call after the restore
# failing) long before 2**63 more characters (centuries at a billion a second) were fed.
MAX_RESTORE_POSITION = (1 << 63) - 1


class EngineSessions:
    """Sessions for the Engine: its store (in memory, or a shared one with its store thread and
    checkpoint task), the session rpcs, and the opening and finishing of every call."""

    # the Engine's, set before _open_store
    models: dict[str, ServedModel]
    limits: Limits
    metrics: Metrics
    snapshot_key: bytes | None
    _model_ids: dict[str, str]
    # the Engine's, read while calls run
    schedulers: dict[str, Scheduler]
    closing: bool

    # ------------------------------------------------------------------ the store
    def _open_store(self, session_store: str | Backend | None) -> None:
        """Open the sessions' store: in memory (None), or the shared one `session_store` names
        or is."""
        backend = open_backend(session_store) if isinstance(session_store, str) else session_store
        self.store: SessionStore | DurableSessions
        self._durable: DurableSessions | None = None  # self.store when it is a shared store
        if backend is None:
            self.store = SessionStore(
                self.limits.max_sessions,
                self.limits.idle_timeout,
                on_evict=self.metrics.evictions.inc,
                max_per_client=self.limits.max_sessions_per_client,
                caller=current_caller,
            )
            self._io: ThreadPoolExecutor | None = None
        else:
            self.store = self._durable = DurableSessions(
                backend,
                {n: self.model_id(n) for n in self.models},
                max_sessions=self.limits.max_sessions,
                idle_timeout=self.limits.idle_timeout,
                lease_ttl=max(3 * self.limits.checkpoint_interval, LEASE_MIN),
                key=self.snapshot_key,
                on_evict=self.metrics.evictions.inc,
                max_per_client=self.limits.max_sessions_per_client,
                caller=current_caller,
            )
            # one thread: the store's reads and writes run in the order they were asked for (a
            # call's last write after its checkpoints), off the event loop
            self._io = ThreadPoolExecutor(1, thread_name_prefix="session-store")
        self._calls: dict[int, Call] = {}  # calls holding a stored session, by id(session)
        self._checkpoints: asyncio.Task | None = None
        self.metrics.max_sessions.set(self.limits.max_sessions)
        self.metrics.active_sessions.set_function(self.store.__len__)  # read at each scrape

    def _start_store(self) -> None:
        """With a shared store: start the checkpoint task and say whether the store answers."""
        if self._durable is not None:
            self._checkpoints = asyncio.ensure_future(self._checkpoint_forever())
            try:
                self._durable.backend.ping()
            except StoreUnavailable as exc:
                # serve anyway: stateless calls work, sessions once it is back
                log.warning("%s; calls on sessions get UNAVAILABLE until it answers", exc)
            else:
                log.info("sessions in %s", self._durable.backend.url)

    async def _close_store(self, loop: asyncio.AbstractEventLoop) -> None:
        """With a shared store: let the calls still running write their sessions, then close."""
        if self._durable is not None:
            assert self._io is not None  # a shared store always has its thread
            # the calls the drain cancelled write their sessions as they unwind: let them, then
            # wait for every write to reach the store (the SIGTERM drain loses no session)
            deadline = time.monotonic() + 5
            while self._calls and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if self._checkpoints is not None:
                self._checkpoints.cancel()
            await loop.run_in_executor(None, functools.partial(self._io.shutdown, wait=True))
            self._durable.close()

    async def _store(self, fn, *args):
        """Run a store method: at once for sessions in memory, on the store thread for a
        shared store; the shared store's own failures become their status codes."""
        if self._io is None:
            return fn(*args)
        # Shielded: a call whose client went away is cancelled while its last write waits its
        # turn on the store thread, and an awaited run_in_executor would then drop the queued
        # write (cancelling the asyncio future cancels the pending job); the session would keep
        # its lease until it lapsed and lose what the call did. The job runs whatever happens.
        # In the call's context: the store reads who is calling (serving.auth.current_caller),
        # which a thread of the pool would not see otherwise.
        job = asyncio.wrap_future(self._io.submit(contextvars.copy_context().run, fn, *args))
        job.add_done_callback(_retrieved)
        try:
            return await asyncio.shield(job)
        except StoreUnavailable as exc:
            raise Unavailable(
                f"{exc}; calls that need a session fail until it answers again, "
                "calls without one still work"
            ) from None
        except SessionLost as exc:
            raise Aborted(str(exc)) from None
        except SessionMismatch as exc:
            raise FailedPrecondition(str(exc)) from None
        except SessionCorrupt as exc:
            raise DataLoss(str(exc)) from None

    async def _checkpoint_forever(self) -> None:
        """Every checkpoint_interval: write the sessions of running calls, renew their leases."""
        while True:
            await asyncio.sleep(self.limits.checkpoint_interval)
            calls = list(self._calls.values())
            results = await asyncio.gather(*map(self._checkpoint, calls), return_exceptions=True)
            for call, result in zip(calls, results, strict=True):
                if isinstance(
                    result, Aborted
                ):  # its lease went to another call: stop, keep nothing
                    log.warning("%s", result)
                    call.seq.cancelled = True
                    self.schedulers[call.name].poke()
                elif isinstance(
                    result, Exception
                ):  # the store is away: the call's last write tells
                    log.warning(
                        "checkpoint of session %s failed: %s", call.session.session_id, result
                    )

    async def _checkpoint(self, call: Call) -> None:
        # still running? (it may have ended since the list was taken: then its last write is
        # queued already, and a checkpoint after it would find the lease given back)
        if self._calls.get(id(call.session)) is call:
            assert self._durable is not None  # calls are tracked with a shared store only
            await self._store(self._durable.checkpoint, call.session, call.keep())

    def expire_sessions(self) -> int:
        """Drop the sessions idle past the timeout (counted in nlstm_session_evictions_total).
        Blocks on a file store's directory: the server runs it off the event loop."""
        try:
            return self.store.expire()
        except StoreUnavailable as exc:
            log.warning("session expiry: %s", exc)
            return 0

    # ----------------------------------------------------------- the session rpcs
    def model(self, name: str) -> ServedModel:
        if not name:
            raise InvalidArgument(
                "model is required (a name from ListModels) unless session_id is set"
            )
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(f"no model {name!r}; this server runs {sorted(self.models)}") from None

    async def create_session(self, model_name: str) -> Session:
        model = self.model(model_name)
        try:
            session = await self._store(self.store.create, model_name, model.initial_state(1)[0])
        except TooManySessions as exc:
            raise ResourceExhausted(str(exc)) from None
        return session

    async def get_session(self, session_id: str) -> Session:
        """The session for a look (it may be in use: then `in_use` is set and its position is
        the one before the running call)."""
        if not session_id:
            raise InvalidArgument("session_id is required")
        try:
            return await self._store(self.store.get, session_id)
        except SessionNotFound as exc:
            raise NotFound(str(exc)) from None

    async def _hold(self, session_id: str) -> Session:
        """Acquire a session for a snapshot or a fork (one call at a time, as for every call)."""
        if not session_id:
            raise InvalidArgument("session_id is required")
        try:
            return await self._store(self.store.acquire, session_id)
        except SessionNotFound as exc:
            raise NotFound(str(exc)) from None
        except SessionBusy as exc:
            raise Aborted(str(exc)) from None

    def model_id(self, name: str) -> str:
        """The identity of the export served as `name` (serving.snapshot.model_identity)."""
        if name not in self._model_ids:
            self._model_ids[name] = snapshot.model_identity(self.models[name].meta)
        return self._model_ids[name]

    async def snapshot_session(self, session_id: str) -> tuple[bytes, Session]:
        """The session's snapshot bytes (signed with the server's key, if any)."""
        session = await self._hold(session_id)
        try:
            state = snapshot.SessionState(
                session.model,
                self.model_id(session.model),
                session.position,
                session.state,
                session.logits,
            )
            return snapshot.encode(state, self.snapshot_key), session
        finally:
            await self._store(self.store.release, session)

    async def restore_session(self, data: bytes) -> Session:
        """A new session holding a snapshot's state: refused with INVALID_ARGUMENT (not a
        readable, verified snapshot) or FAILED_PRECONDITION (another model or export)."""
        if not data:
            raise InvalidArgument("data is required: the bytes of a SessionSnapshot")
        try:
            s = snapshot.decode(data, self.snapshot_key, max_bytes=self._snapshot_max_bytes())
            if s.model not in self.models:
                raise snapshot.SnapshotMismatch(
                    f"snapshot is of model {s.model!r}, which this server does not run "
                    f"(it runs {sorted(self.models)})"
                )
            model = self.models[s.model]
            snapshot.check_model(
                s, s.model, self.model_id(s.model), model.meta.state_shape, model.meta.output_size
            )
        except snapshot.SnapshotMismatch as exc:
            raise FailedPrecondition(str(exc)) from None
        except snapshot.SnapshotInvalid as exc:
            raise InvalidArgument(str(exc)) from None
        if s.position > MAX_RESTORE_POSITION:
            raise InvalidArgument(
                f"snapshot position {s.position} is past {MAX_RESTORE_POSITION}, the largest "
                "a restored session may start at (positions are uint64): the snapshot is forged"
            )
        try:
            return await self._store(self.store.create, s.model, s.state, s.logits, s.position)
        except TooManySessions as exc:
            raise ResourceExhausted(str(exc)) from None

    def _snapshot_max_bytes(self) -> int:
        """The largest snapshot one of this server's models makes, with room for the header."""
        return max(
            snapshot.max_size(m.meta.state_shape, m.meta.output_size) for m in self.models.values()
        )

    async def fork_session(self, session_id: str) -> Session:
        """A new session with a copy of the session's state and position."""
        session = await self._hold(session_id)
        try:
            return await self._store(
                self.store.create, session.model, session.state, session.logits, session.position
            )
        except TooManySessions as exc:
            raise ResourceExhausted(str(exc)) from None
        finally:
            await self._store(self.store.release, session)

    async def close_session(self, session_id: str) -> None:
        if not session_id:
            raise InvalidArgument("session_id is required")
        try:
            await self._store(self.store.delete, session_id)
        except SessionNotFound as exc:
            raise NotFound(str(exc)) from None

    async def _open(
        self, model_name: str, session_id: str, kind: str, rpc: str
    ) -> tuple[str, ServedModel, Session | None, np.ndarray, np.ndarray | None]:
        """(model name, model, session or None, state, logits) for a call; the caller must
        _finish it."""
        if self.closing:
            raise Unavailable("the server is shutting down; retry on another replica")
        session = None
        if session_id:
            try:
                session = await self._store(self.store.acquire, session_id)
            except SessionNotFound as exc:
                raise NotFound(str(exc)) from None
            except SessionBusy as exc:
                raise Aborted(str(exc)) from None
            if model_name and model_name != session.model:
                await self._store(self.store.release, session)
                raise InvalidArgument(
                    f"session {session_id} runs model {session.model!r}, not {model_name!r} "
                    "(leave model empty or name the session's model)"
                )
            model_name = session.model
        model = self.model(model_name)
        if model.meta.kind != kind:
            if session is not None:
                await self._store(self.store.release, session)
            what = "character models" if kind == "char" else "glimpse classifiers"
            raise FailedPrecondition(
                f"{rpc} runs on {what}; model {model_name!r} is a {model.meta.kind} model"
            )
        if session is not None:
            return model_name, model, session, session.state, session.logits
        return model_name, model, None, model.initial_state(1)[0], None

    def _track(self, name: str, session: Session | None, seq: Sequence, keep) -> None:
        """With a shared store: checkpoint this call's session while it runs; `keep()` says
        what the session would hold if the call ended now (None: as it was)."""
        if session is not None and self._io is not None:
            self._calls[id(session)] = Call(name, session, seq, keep)

    async def _finish(
        self, name: str, session: Session | None, seq: Sequence, keep: Keep | None
    ) -> None:
        """End a call: stop its sequence if it still runs, store `keep` (state, logits,
        position) in the session (None: leave it unchanged), release the session."""
        if not seq.finished:
            seq.cancelled = True
            self.schedulers[name].poke()
        if session is not None:
            self._calls.pop(id(session), None)
            if keep is not None:
                state, logits, session.position = keep
                # copies: the state is often a row of a whole batch's step output, which a view
                # would keep alive as long as the session (64 x 7 KB for the PTB model at batch 64)
                session.state = state.copy()
                session.logits = None if logits is None else logits.copy()
            await self._store(self.store.release, session)


def _retrieved(job: asyncio.Future) -> None:
    """Mark a store job's failure as seen (its caller may have been cancelled meanwhile)."""
    if not job.cancelled():
        job.exception()
