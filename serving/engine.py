"""The serving domain: Generate, Score and glimpse classification over exported models, with
sessions and batched steps. No gRPC here: the servicer turns each request proto into a checked
request object (serving/requests.py), which the calls below take, and maps the domain's errors
(serving/errors.py) to status codes.

Each model is served through its `Batcher` (one batched step graph call for all sequences
that are ready). A sequence's place is (state, logits): the state after the last symbol fed
and the logits that predict the next one, so a session continues exactly where its last call
stopped; its position counts the characters (or glimpses) that state has taken in. A call
that does not complete leaves its session as the .proto's header says (Generate: the prompt
and the messages sent; Score: unchanged; glimpses: those answered), and `_finish`
(serving/engine_sessions.py) is where each call commits what its session keeps. Sessions also
travel as snapshots (serving/snapshot.py).

Sessions (where they live, the session rpcs, how a call opens, checkpoints and finishes
its session) are the engine's other half, serving/engine_sessions.py, which Engine inherits.

A fresh sequence starts with one "start" step: the tokenizer's begin-of-sequence symbol if it
has one (the poems), else the newline if it is in the vocabulary (PTB: text follows a line
break), else the space (text8); its prediction scores the first character
(serving.formats.start_id, which ExportedModel.score shares).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import AsyncGenerator
from typing import Protocol

import numpy as np

from serving.calls import GlimpseStream, Mailbox, generate_sequence, id_texts
from serving.engine_sessions import EngineSessions
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
)
from serving.store import Backend


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


class Engine(EngineSessions):
    """Serves `models`: a scheduler per model, the calls (score, generate, glimpse_stream), and
    through EngineSessions the sessions they run on."""

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
        self._open_store(session_store)
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
        self._start_store()

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
        await self._close_store(loop)

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
