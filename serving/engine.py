"""The serving domain: Generate, Score and glimpse classification over exported models, with
sessions and batched steps. No gRPC here: the servicer turns each request proto into a checked
request object (serving/requests.py), which the calls below take, and maps the domain's errors
(serving/errors.py) to status codes.

Each model is served through its `Batcher` (one batched step graph call for all sequences
that are ready). A sequence's place is (state, logits): the state after the last symbol fed
and the logits that predict the next one, so a session continues exactly where its last call
stopped; its position counts the characters (or glimpses) that state has taken in. A call
that does not complete leaves its session as the .proto's header says (Generate: the prompt
and the messages sent; Score: unchanged; glimpses: those answered), and `_finish` is where
each call commits what its session keeps. Sessions also travel as snapshots
(serving/snapshot.py).

Sessions live in the process (SessionStore, `--session-store memory`) or in a shared store
(serving/durable.py over serving/store.py: `file:DIR`, `redis://...`). With a shared store a
call reads its session when it starts and writes it when it ends, on the store thread (never
on the event loop, never per character on the scheduler's); while it runs, a checkpoint task
writes what the session would keep if the call ended now (Generate: the prompt and the
messages sent; glimpses: those answered) and renews the call's lease every
`checkpoint_interval` seconds, so that a replica that dies loses at most that much.

A fresh sequence starts with one "start" step: the tokenizer's begin-of-sequence symbol if it
has one (the poems), else the newline if it is in the vocabulary (PTB: text follows a line
break), else the space (text8); its prediction scores the first character
(serving.formats.start_id, which ExportedModel.score shares).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from serving import snapshot
from serving.auth import current_caller
from serving.calls import Call, GlimpseStream, Keep, Mailbox, generate_sequence, id_texts
from serving.durable import DurableSessions, SessionCorrupt, SessionLost, SessionMismatch
from serving.errors import (
    Aborted,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServingError,
    Unavailable,
)
from serving.formats import Tokenizer, start_id
from serving.limits import Limits
from serving.metrics import Metrics
from serving.prefix_cache import PrefixCache
from serving.requests import GenerateParams, GlimpseParams, ScoreParams
from serving.scheduler import (
    MAX_SPACING,
    GenerateSequence,
    GlimpseSequence,
    Scheduler,
    ScoreSequence,
    Sequence,
)
from serving.sessions import Session, SessionBusy, SessionNotFound, SessionStore, TooManySessions
from serving.store import Backend, StoreUnavailable, open_backend

log = logging.getLogger("nlstm.serving")


class ModelMeta(Protocol):
    """What the engine reads of a served model's meta.json (serving.formats.ExportMeta)."""

    kind: str  # "char" or "glimpse"
    state_slots: list[str]  # the S slot names: "layer0.h", ...; HM-LSTM boundaries end in ".z"
    files: dict[str, str]  # file name -> sha256 (serving.snapshot.model_identity)

    @property
    def state_shape(self) -> tuple[int, int]: ...  # (S, H)

    @property
    def output_size(self) -> int: ...  # V or the number of classes


class ServedModel(Protocol):
    """What serving/runtime.py's loaded model offers the engine."""

    @property
    def meta(self) -> ModelMeta: ...

    @property
    def tokenizer(self) -> Tokenizer | None: ...  # every char model has one

    def initial_state(self, batch_size: int) -> np.ndarray: ...

    # Must not write into its inputs: the scheduler feeds a step's outputs back as the next
    # step's inputs, and sessions keep rows of them. check=False: skip the model's own input
    # checks (the scheduler builds the inputs itself).
    def step(
        self, inputs: np.ndarray, state: np.ndarray, *, check: bool = True
    ) -> tuple[np.ndarray, np.ndarray]: ...


MAX_STREAM_INTERVAL = MAX_SPACING  # the longest --stream-interval-ms allowed
MAX_PREFIX_CACHE_MB = 1 << 20  # the largest --prefix-cache-mb allowed (1 TiB)
# The shortest lease on a session in a shared store: a lease that lapses while its call still
# runs (an event loop held up on a loaded machine) loses that call's result, so even frequent
# checkpoints get a lease that outlives a stall of a second or two.
LEASE_MIN = 2.0
# The largest position RestoreSession accepts: a session's position is a uint64 on the wire,
# and one restored nearer its end than this would overflow it (every call after the restore
# failing) long before 2**63 more characters (centuries at a billion a second) were fed.
MAX_RESTORE_POSITION = (1 << 63) - 1


class Engine:
    def __init__(
        self,
        models: dict[str, ServedModel],
        limits: Limits | None = None,
        metrics: Metrics | None = None,
        snapshot_key: bytes | None = None,
        session_store: str | Backend | None = "memory",
    ) -> None:
        self.models = models
        self.limits = limits or Limits()
        if snapshot_key is not None and len(snapshot_key) < 16:
            raise ValueError(f"a snapshot key must be at least 16 bytes, got {len(snapshot_key)}")
        self.snapshot_key = snapshot_key  # signs snapshots and is required of restored ones
        self._model_ids: dict[str, str] = {}
        if not 0 <= self.limits.stream_interval <= MAX_STREAM_INTERVAL:  # NaN fails too
            raise ValueError(
                f"stream_interval must be in [0, {MAX_STREAM_INTERVAL:g}] seconds, "
                f"got {self.limits.stream_interval}"
            )
        if not 0 <= self.limits.max_messages_per_s < math.inf:
            raise ValueError(
                "max_messages_per_s must be a finite number >= 0 (0: no budget), "
                f"got {self.limits.max_messages_per_s}"
            )
        if not 0 <= self.limits.prefix_cache_mb <= MAX_PREFIX_CACHE_MB:
            raise ValueError(
                f"prefix_cache_mb must be in [0, {MAX_PREFIX_CACHE_MB}] MiB (0: no cache), "
                f"got {self.limits.prefix_cache_mb}"
            )
        if not 0.05 <= self.limits.checkpoint_interval <= 600:  # NaN fails too
            raise ValueError(
                "checkpoint_interval must be in [0.05, 600] seconds, got "
                f"{self.limits.checkpoint_interval}"
            )
        self.metrics = metrics or Metrics()
        cache_bytes = int(self.limits.prefix_cache_mb * 2**20)
        self.prefix_cache = PrefixCache(cache_bytes, metrics=self.metrics) if cache_bytes else None
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
                {n: self.model_id(n) for n in models},
                max_sessions=self.limits.max_sessions,
                idle_timeout=self.limits.idle_timeout,
                lease_ttl=max(3 * self.limits.checkpoint_interval, LEASE_MIN),
                key=snapshot_key,
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
        self.schedulers: dict[str, Scheduler] = {}
        self.texts: dict[str, list[str]] = {}  # per char model: each id's text
        self.closing = False

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Start one scheduler thread per model; call from the event loop that serves."""
        loop = asyncio.get_running_loop()
        for name, model in self.models.items():
            self.schedulers[name] = Scheduler(
                # the scheduler builds well-formed inputs (ids from the tokenizer and the sampler,
                # glimpses checked on arrival) and states (the runtime's own outputs)
                functools.partial(model.step, check=False),
                max_batch=self.limits.max_batch,
                max_wait=self.limits.max_wait,
                name=name,
                post=loop.call_soon_threadsafe,
                on_batch=self._on_batch(name),
                message_rate=self.limits.max_messages_per_s,
            )
            # read at each scrape, so that they never go stale when the scheduler idles
            self.metrics.active_sequences.labels(name).set_function(self.schedulers[name].active)
            self.metrics.queue_depth.labels(name).set_function(self.schedulers[name].waiting)
            if model.meta.kind == "char" and model.tokenizer is not None:
                self.texts[name] = id_texts(model.tokenizer)
                if self.prefix_cache is not None:
                    self.prefix_cache.add_model(name)
        if self._durable is not None:
            self._checkpoints = asyncio.ensure_future(self._checkpoint_forever())
            try:
                self._durable.backend.ping()
            except (
                StoreUnavailable
            ) as exc:  # serve anyway: stateless calls work, sessions once it is back
                log.warning("%s; calls on sessions get UNAVAILABLE until it answers", exc)
            else:
                log.info("sessions in %s", self._durable.backend.url)

    def _on_batch(self, name: str):
        batch, seconds = (
            self.metrics.batch_size.labels(name),
            self.metrics.step_seconds.labels(name),
        )

        def record(size: int, elapsed: float) -> None:  # runs on the scheduler thread
            batch.observe(size)
            seconds.observe(elapsed)

        return record

    def end_generation(self) -> None:
        """Stop every Generate still running (the server is draining): each stream ends with
        FINISH_REASON_CANCELLED and its session keeps the characters made."""
        for s in self.schedulers.values():
            s.cancel(GenerateSequence)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for s in self.schedulers.values():
            await loop.run_in_executor(None, s.stop)
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

    # ---------------------------------------------------------------- models
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

    # -------------------------------------------------------------- text
    async def score(self, params: ScoreParams):
        name, model, session, state, logits = await self._open(
            params.model, params.session_id, "char", "Score"
        )
        tok = model.tokenizer
        assert tok is not None  # _open checked the kind, and every char model has a tokenizer
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def scored(s: ScoreSequence) -> None:  # on the event loop
            if not done.done():  # not cancelled meanwhile
                done.set_result(s)

        enc = tok.encode(params.text)
        z_slots = [i for i, s in enumerate(model.meta.state_slots) if s.endswith(".z")]
        seq = ScoreSequence(state, logits, start_id(tok), enc.ids, z_slots, scored)
        position = (session.position if session is not None else 0) + len(enc.ids)
        keep = None  # all or nothing: the session changes only when the whole text was scored
        self._track(name, session, seq, lambda: None)  # checkpoints only renew the lease
        try:
            self.schedulers[name].add(seq)
            await done
            if seq.error is not None:
                raise seq.error
            keep = (*seq.pos, position)
        finally:
            await self._finish(name, session, seq, keep)
        self.metrics.chars_scored.labels(name).inc(len(enc.ids))
        total = float(seq.bits.sum())
        return {
            "bits_per_char": total / len(enc.ids),
            "total_bits": total,
            "num_chars": len(enc.ids),
            "bits": seq.bits.astype(np.float32).tolist() if params.per_char else [],
            "unknown_chars": int(enc.unknown_chars),
            "boundaries": [b.decode() for b in seq.boundaries] if params.per_char else [],
            "position": position,
        }

    async def generate(
        self, p: GenerateParams
    ) -> AsyncGenerator[tuple[str, list[float], str, int]]:
        """Yields (text, bits, finish_reason, position): the characters generated since the last
        yield (several when the reader is slower than generation), finish_reason "" until the
        last ("LENGTH", "STOP_SEQUENCE", or "CANCELLED" when the server stopped it), and the
        position after them.

        The caller asks for the next item only once it has sent the last one: that is how this
        generator knows which messages went out. When it is closed, the session keeps the prompt
        and the characters of the messages sent (their boundary states, kept by the sequence)."""
        name, model, session, state, logits = await self._open(
            p.model, p.session_id, "char", "Generate"
        )
        tok = model.tokenizer
        assert tok is not None  # _open checked the kind, and every char model has a tokenizer
        box = Mailbox()

        def put(text, bits, reason, made) -> None:  # a message (or the end) from the scheduler
            waiting = box.items
            if made is not None and waiting and waiting[-1][3] not in (None, made):
                # not taken yet: it goes out coalesced with this one, its boundary is never needed
                seq.forget(waiting[-1][3])
            box.put(text, bits, reason, made)

        prompt_ids = [int(i) for i in tok.encode(p.prompt).ids]
        feed = ([start_id(tok)] if logits is None else []) + prompt_ids
        recorder = None
        if (
            self.prefix_cache is not None
            and logits is None
            and np.array_equal(state, model.initial_state(1)[0])
        ):
            # from the initial state: start after the longest cached prefix of the feed
            state, logits, feed, recorder = self.prefix_cache.start(name, feed, state)
        base = session.position if session is not None else 0
        sent = 0  # symbols generated up to the end of the last message sent
        seq = generate_sequence(
            p,
            tok,
            self.texts[name],
            state,
            logits,
            feed,
            put,
            interval=self.limits.stream_interval,
            boundaries=session is not None,
        )
        seq.recorder = recorder
        counter = self.metrics.chars_generated.labels(name)
        t0, first = time.perf_counter(), True

        def keep():  # what the session holds if the call ends now (`sent` as it is then)
            mark = seq.mark(sent)
            return None if mark is None else (*mark, base + len(prompt_ids) + sent)

        self._track(name, session, seq, keep)
        try:
            self.schedulers[name].add(seq)
            while True:
                # the messages posted since the last take: one, or more when the reader is slower
                items = await box.take()
                chunk = [i for i in items if i[0] is not None]
                if chunk:
                    text = "".join(c[0] for c in chunk)
                    if first and text:
                        self.metrics.first_char.labels(name).observe(time.perf_counter() - t0)
                        first = False
                    counter.inc(len(text))
                    made = chunk[-1][3]  # None: the prompt was not all fed (a drain stopped it)
                    position = base if made is None else base + len(prompt_ids) + made
                    yield text, [b for c in chunk for b in c[1]], chunk[-1][2], position
                    if made is not None:  # resumed: the caller sent that message
                        if made != sent:
                            seq.forget(sent)  # the boundary before it is no longer needed
                        sent = made
                if items[-1][0] is None:  # end of stream
                    if seq.error is not None:
                        raise seq.error
                    return
        finally:
            # None: the prompt was never all fed; the session stays as it was
            await self._finish(name, session, seq, keep())

    # ------------------------------------------------------------- glimpses
    async def glimpse_stream(self, first: GlimpseParams) -> GlimpseStream:
        """A ClassifyGlimpses stream on the model or session its first message names (the
        caller then pushes that message's glimpse too)."""
        name, _, session, state, _ = await self._open(
            first.model, first.session_id, "glimpse", "ClassifyGlimpses"
        )
        seq = GlimpseSequence(state)
        self.schedulers[name].add(seq)
        stream = GlimpseStream(self, name, session, seq)
        self._track(name, session, seq, lambda: stream._sent)
        return stream


def _retrieved(job: asyncio.Future) -> None:
    """Mark a store job's failure as seen (its caller may have been cancelled meanwhile)."""
    if not job.cancelled():
        job.exception()


# The errors and Limits are defined in serving/errors.py and serving/limits.py; the engine is
# where callers have always found them.
__all__ = [
    "Aborted",
    "DataLoss",
    "Engine",
    "FailedPrecondition",
    "GlimpseStream",
    "InvalidArgument",
    "Limits",
    "NotFound",
    "ResourceExhausted",
    "ServingError",
    "Unavailable",
]
