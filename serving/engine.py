"""The serving domain: Generate, Score and glimpse classification over exported models, with
sessions and batched steps. No gRPC here: the servicer converts protos and maps the errors
below to status codes.

Each model is served through its `Batcher` (one batched step graph call for all sequences
that are ready). A sequence's position is (state, logits): the state after the last symbol fed
and the logits that predict the next one, so a session continues exactly where its last call
stopped. A fresh sequence starts with one "start" step: the tokenizer's begin-of-sequence
symbol if it has one (the poems), else the newline if it is in the vocabulary (PTB: text
follows a line break), else the space (text8); its prediction scores the first character
(serving.formats.start_id, which ExportedModel.score shares).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

import numpy as np

from serving.formats import GLIMPSE_SIZE, start_id
from serving.metrics import Metrics
from serving.prefix_cache import PrefixCache
from serving.sampling import Sampler, check_sampling, log_softmax
from serving.scheduler import MAX_SPACING, GenerateSequence, GlimpseSequence, ScoreSequence, Scheduler, Sequence
from serving.sessions import Session, SessionBusy, SessionNotFound, SessionStore, TooManySessions


# The errors of the domain, each one gRPC status code (see the .proto's header).
class ServingError(Exception):
    code = "UNKNOWN"


class NotFound(ServingError):
    code = "NOT_FOUND"


class InvalidArgument(ServingError):
    code = "INVALID_ARGUMENT"


class FailedPrecondition(ServingError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServingError):
    code = "RESOURCE_EXHAUSTED"


class Aborted(ServingError):
    code = "ABORTED"


class Unavailable(ServingError):
    code = "UNAVAILABLE"


class ServedModel(Protocol):
    """What serving/runtime.py's loaded model offers the engine."""

    meta: object  # serving.formats.ExportMeta
    tokenizer: object | None  # serving.formats.Tokenizer for char models

    def initial_state(self, batch_size: int) -> np.ndarray: ...

    # Must not write into its inputs: the scheduler feeds a step's outputs back as the next
    # step's inputs, and sessions keep rows of them. check=False: skip the model's own input
    # checks (the scheduler builds the inputs itself).
    def step(self, inputs: np.ndarray, state: np.ndarray, *, check: bool = True) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class Limits:
    """Server limits and batching settings (flags and environment variables of `nlstm serve`)."""

    max_chars: int = 4096  # most characters one Generate may ask for
    max_text: int = 100_000  # longest Score text or Generate prompt, in characters
    max_sessions: int = 1024
    idle_timeout: float = 600.0  # seconds
    max_batch: int = 64  # sequences advanced together in one step
    max_wait: float = 0.002  # seconds the oldest waiting step waits for company
    # Generate: after a message, a stream's next one waits until this many seconds have passed
    # and carries every character made meanwhile (0: each as soon as it is made, within the
    # message budget below). Each message costs the server about 0.1 ms of Python (gRPC's and
    # ours) on the cores the model needs, and the client as much again.
    stream_interval: float = 0.05
    # Generate: the most messages per second all of one model's streams send together (0: no
    # budget). With n streams running, a stream's messages are at least n / this seconds apart
    # (when that is longer than stream_interval; at most 10 s): 400 keeps 50 ms up to 20
    # streams and spaces 64 streams' messages 160 ms apart, so that messages cost a bounded
    # share of the CPU.
    max_messages_per_s: float = 400.0
    max_stop: int = 4
    # the prefix-state cache's bound over all models, in MiB (serving/prefix_cache.py; 0: off)
    prefix_cache_mb: float = 64.0


MAX_STREAM_INTERVAL = MAX_SPACING  # the longest --stream-interval-ms allowed
MAX_PREFIX_CACHE_MB = 1 << 20  # the largest --prefix-cache-mb allowed (1 TiB)


class Engine:
    def __init__(self, models: dict[str, ServedModel], limits: Limits | None = None,
                 metrics: Metrics | None = None) -> None:
        self.models = models
        self.limits = limits or Limits()
        if not 0 <= self.limits.stream_interval <= MAX_STREAM_INTERVAL:  # NaN fails too
            raise ValueError(f"stream_interval must be in [0, {MAX_STREAM_INTERVAL:g}] seconds, "
                             f"got {self.limits.stream_interval}")
        if not 0 <= self.limits.max_messages_per_s < math.inf:
            raise ValueError("max_messages_per_s must be a finite number >= 0 (0: no budget), "
                             f"got {self.limits.max_messages_per_s}")
        if not 0 <= self.limits.prefix_cache_mb <= MAX_PREFIX_CACHE_MB:
            raise ValueError(f"prefix_cache_mb must be in [0, {MAX_PREFIX_CACHE_MB}] MiB (0: no cache), "
                             f"got {self.limits.prefix_cache_mb}")
        self.metrics = metrics or Metrics()
        cache_bytes = int(self.limits.prefix_cache_mb * 2**20)
        self.prefix_cache = PrefixCache(cache_bytes, metrics=self.metrics) if cache_bytes else None
        self.store = SessionStore(self.limits.max_sessions, self.limits.idle_timeout,
                                  on_evict=self.metrics.evictions.inc)
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
                functools.partial(model.step, check=False), max_batch=self.limits.max_batch, max_wait=self.limits.max_wait, name=name,
                post=loop.call_soon_threadsafe, on_batch=self._on_batch(name),
                message_rate=self.limits.max_messages_per_s,
            )
            # read at each scrape, so that they never go stale when the scheduler idles
            self.metrics.active_sequences.labels(name).set_function(self.schedulers[name].active)
            self.metrics.queue_depth.labels(name).set_function(self.schedulers[name].waiting)
            if model.meta.kind == "char" and model.tokenizer is not None:
                self.texts[name] = id_texts(model.tokenizer)
                if self.prefix_cache is not None:
                    self.prefix_cache.add_model(name)

    def _on_batch(self, name: str):
        batch, seconds = self.metrics.batch_size.labels(name), self.metrics.step_seconds.labels(name)

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
        for s in self.schedulers.values():
            await asyncio.get_running_loop().run_in_executor(None, s.stop)

    def expire_sessions(self) -> int:
        """Drop the sessions idle past the timeout (counted in nlstm_session_evictions_total)."""
        return self.store.expire()

    # ---------------------------------------------------------------- models
    def model(self, name: str) -> ServedModel:
        if not name:
            raise InvalidArgument("model is required (a name from ListModels) unless session_id is set")
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(f"no model {name!r}; this server runs {sorted(self.models)}") from None

    def create_session(self, model_name: str) -> Session:
        model = self.model(model_name)
        try:
            session = self.store.create(model_name, model.initial_state(1)[0])
        except TooManySessions as exc:
            raise ResourceExhausted(str(exc)) from None
        return session

    def close_session(self, session_id: str) -> None:
        if not session_id:
            raise InvalidArgument("session_id is required")
        try:
            self.store.delete(session_id)
        except SessionNotFound as exc:
            raise NotFound(str(exc)) from None

    def _open(self, model_name: str, session_id: str, kind: str, rpc: str):
        """(model name, model, session or None, state, logits) for a call; the caller must
        _finish it."""
        if self.closing:
            raise Unavailable("the server is shutting down; retry on another replica")
        session = None
        if session_id:
            try:
                session = self.store.acquire(session_id)
            except SessionNotFound as exc:
                raise NotFound(str(exc)) from None
            except SessionBusy as exc:
                raise Aborted(str(exc)) from None
            if model_name and model_name != session.model:
                self.store.release(session)
                raise InvalidArgument(
                    f"session {session_id} runs model {session.model!r}, not {model_name!r} "
                    "(leave model empty or name the session's model)"
                )
            model_name = session.model
        model = self.model(model_name)
        if model.meta.kind != kind:
            if session is not None:
                self.store.release(session)
            what = "character models" if kind == "char" else "glimpse classifiers"
            raise FailedPrecondition(
                f"{rpc} runs on {what}; model {model_name!r} is a {model.meta.kind} model"
            )
        if session is not None:
            return model_name, model, session, session.state, session.logits
        return model_name, model, None, model.initial_state(1)[0], None

    def _finish(self, name: str, session: Session | None, seq: Sequence) -> None:
        """End a call: stop its sequence if it still runs, keep its last whole step in the
        session, release the session."""
        if not seq.finished:
            seq.cancelled = True
            self.schedulers[name].poke()
        if session is not None:
            state, logits = seq.pos
            # copies: the position is a row of a whole batch's step output, which a view would
            # keep alive as long as the session (64 x 7 KB for the PTB model at batch 64)
            session.state = state.copy()
            session.logits = None if logits is None else logits.copy()
            self.store.release(session)

    # -------------------------------------------------------------- text
    async def score(self, model_name: str, session_id: str, text: str, per_char: bool):
        if not text:
            raise InvalidArgument("text must not be empty")
        if len(text) > self.limits.max_text:
            raise ResourceExhausted(
                f"text has {len(text)} characters; this server scores at most {self.limits.max_text} per call"
            )
        name, model, session, state, logits = self._open(model_name, session_id, "char", "Score")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        enc = model.tokenizer.encode(text)
        z_slots = [i for i, s in enumerate(model.meta.state_slots) if s.endswith(".z")]
        seq = ScoreSequence(state, logits, start_id(model.tokenizer), enc.ids, z_slots,
                            lambda s: done.done() or done.set_result(s))
        try:
            self.schedulers[name].add(seq)
            await done
            if seq.error is not None:
                raise seq.error
        finally:
            self._finish(name, session, seq)
        self.metrics.chars_scored.labels(name).inc(len(enc.ids))
        total = float(seq.bits.sum())
        return {
            "bits_per_char": total / len(enc.ids),
            "total_bits": total,
            "num_chars": len(enc.ids),
            "bits": seq.bits.astype(np.float32).tolist() if per_char else [],
            "unknown_chars": int(enc.unknown_chars),
            "boundaries": [b.decode() for b in seq.boundaries] if per_char else [],
        }

    async def generate(self, model_name: str, session_id: str, prompt: str, max_chars: int,
                       temperature: float, top_k: int, top_p: float, seed: int | None,
                       stop: list[str], logprobs: bool) -> AsyncIterator[tuple[str, list[float], str]]:
        """Yields (text, bits, finish_reason): the characters generated since the last yield
        (several when the reader is slower than generation), finish_reason "" until the last
        ("LENGTH", "STOP_SEQUENCE", or "CANCELLED" when the server stopped it)."""
        if not 1 <= max_chars <= self.limits.max_chars:
            raise InvalidArgument(f"max_chars must be in [1, {self.limits.max_chars}], got {max_chars}")
        try:
            check_sampling(temperature, top_k, top_p)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if len(stop) > self.limits.max_stop or any(not s for s in stop):
            raise InvalidArgument(
                f"stop takes at most {self.limits.max_stop} non-empty strings, got {len(stop)}"
                + (" including an empty one" if any(not s for s in stop) else "")
            )
        if len(prompt) > self.limits.max_text:
            raise ResourceExhausted(
                f"prompt has {len(prompt)} characters; at most {self.limits.max_text} are allowed"
            )
        name, model, session, state, logits = self._open(model_name, session_id, "char", "Generate")
        tok = model.tokenizer
        banned = banned_ids(tok)
        box = Mailbox()
        feed = ([start_id(model.tokenizer)] if logits is None else []) + [int(i) for i in tok.encode(prompt).ids]
        recorder = None
        if self.prefix_cache is not None and logits is None and np.array_equal(state, model.initial_state(1)[0]):
            # from the initial state: start after the longest cached prefix of the feed
            state, logits, feed, recorder = self.prefix_cache.start(name, feed, state)
        seq = GenerateSequence(
            state, logits, feed, Sampler(temperature, top_k, top_p, seed, banned), max_chars, stop, logprobs,
            self.texts[name], tok.eos_id, box.put, interval=self.limits.stream_interval,
        )
        seq.recorder = recorder
        counter = self.metrics.chars_generated.labels(name)
        t0, first = time.perf_counter(), True
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
                    yield text, [b for c in chunk for b in c[1]], chunk[-1][2]
                if items[-1][0] is None:  # end of stream
                    if seq.error is not None:
                        raise seq.error
                    return
        finally:
            self._finish(name, session, seq)

    # ------------------------------------------------------------- glimpses
    def glimpse_stream(self, model_name: str, session_id: str) -> "GlimpseStream":
        name, model, session, state, _ = self._open(model_name, session_id, "glimpse", "ClassifyGlimpses")
        seq = GlimpseSequence(state)
        self.schedulers[name].add(seq)
        return GlimpseStream(self, name, session, seq)


def id_texts(tok) -> list[str]:
    """Each id's text, decoded once (generation emits one id per character); markers and the
    unknown piece are empty."""
    special = {i for i in (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) if i is not None and i >= 0}
    return [tok.decode([i]) if i not in special else "" for i in range(tok.vocab_size)]


def banned_ids(tok) -> tuple[int, ...]:
    """Ids Generate never samples: the unknown piece, the begin marker, padding."""
    return tuple(i for i in (tok.unk_id, tok.bos_id, tok.pad_id) if i is not None and i >= 0)


class Mailbox:
    """A Generate call's characters, put by the scheduler's callbacks and taken by the call's
    coroutine, both on the event loop (lighter than an asyncio.Queue: one list, one waiter)."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def put(self, *item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list:
        """Every item put since the last take; waits for one if there is none."""
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.take_nowait()

    def take_nowait(self) -> list:
        items, self.items = self.items, []
        return items


class GlimpseStream:
    """One ClassifyGlimpses call: glimpses in, class probabilities out, state carried."""

    def __init__(self, engine: Engine, name: str, session, seq: GlimpseSequence):
        self.engine, self.name, self.session, self.seq = engine, name, session, seq
        self.steps = 0

    async def push(self, pixels) -> tuple[int, list[float], int]:
        x = np.asarray(pixels, dtype=np.float32)
        if x.shape != (GLIMPSE_SIZE,) or not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise InvalidArgument(
                f"a glimpse is {GLIMPSE_SIZE} finite floats in [0, 1] (7x7, row-major); got "
                f"{x.size} values" + ("" if x.size != GLIMPSE_SIZE or np.isfinite(x).all() else " with NaN or infinity")
            )
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        self.seq.inputs.append((x, lambda logits: reply.done() or reply.set_result(logits)))
        self.engine.schedulers[self.name].poke()
        logits = await reply
        self.steps += 1
        self.engine.metrics.glimpses.labels(self.name).inc()
        p = np.exp(log_softmax(logits))
        return self.steps, p.astype(np.float32).tolist(), int(np.argmax(p))

    def close(self) -> None:
        self.seq.finished = True  # nothing more will come; the scheduler drops it
        self.engine._finish(self.name, self.session, self.seq)


__all__ = [
    "Aborted", "Engine", "FailedPrecondition", "GlimpseStream", "InvalidArgument", "Limits",
    "NotFound", "ResourceExhausted", "ServingError", "Unavailable",
]
