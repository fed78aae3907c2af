"""The serving domain: Generate, Score and glimpse classification over exported models, with
sessions and batched steps. No gRPC here: the servicer converts protos and maps the errors
below to status codes.

Each model is served through its `Batcher` (one batched step graph call for all sequences
that are ready). A sequence's position is (state, logits): the state after the last symbol fed
and the logits that predict the next one, so a session continues exactly where its last call
stopped. A fresh sequence starts with one "start" step: the tokenizer's begin-of-sequence
symbol if it has one (the poems), else the newline if it is in the vocabulary (PTB: text
follows a line break), else the space (text8); its prediction scores the first character.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

import numpy as np

from serving.batcher import Batcher
from serving.formats import GLIMPSE_SIZE
from serving.metrics import Metrics
from serving.sampling import Sampler, bits, check_sampling, log_softmax
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
    def step(self, inputs: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class Limits:
    """Server limits and batching settings (flags and environment variables of `nlstm serve`)."""

    max_chars: int = 4096  # most characters one Generate may ask for
    max_text: int = 100_000  # longest Score text or Generate prompt, in characters
    max_sessions: int = 1024
    idle_timeout: float = 600.0  # seconds
    max_batch: int = 64  # sequences advanced together in one step
    max_wait: float = 0.002  # seconds the oldest waiting step waits for company
    max_stop: int = 4


@dataclass
class Position:
    """Where one sequence stands: its state (S, H) and the logits predicting its next symbol."""

    state: np.ndarray
    logits: np.ndarray | None


class Engine:
    def __init__(self, models: dict[str, ServedModel], limits: Limits | None = None,
                 metrics: Metrics | None = None) -> None:
        self.models = models
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.store = SessionStore(self.limits.max_sessions, self.limits.idle_timeout)
        self.batchers: dict[str, Batcher] = {}
        self.logits: dict[str, np.ndarray] = {}  # session id -> logits predicting its next symbol
        self.closing = False

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        for name, model in self.models.items():
            b = Batcher(model.step, max_batch=self.limits.max_batch, max_wait=self.limits.max_wait,
                        on_batch=self._on_batch(name), name=name)
            b.start()
            self.batchers[name] = b

    def _on_batch(self, name: str):
        def record(size: int, seconds: float) -> None:
            self.metrics.batch_size.labels(name).observe(size)
            self.metrics.step_seconds.labels(name).observe(seconds)
            self.metrics.queue_depth.labels(name).set(self.batchers[name].queue_depth())
        return record

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()

    def expire_sessions(self) -> int:
        gone = self.store.expire()
        if gone:
            self.metrics.evictions.inc(gone)
        self.metrics.active_sessions.set(len(self.store))
        return gone

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
        self.metrics.active_sessions.set(len(self.store))
        return session

    def close_session(self, session_id: str) -> None:
        if not session_id:
            raise InvalidArgument("session_id is required")
        try:
            self.store.delete(session_id)
        except SessionNotFound as exc:
            raise NotFound(str(exc)) from None
        self.logits.pop(session_id, None)
        self.metrics.active_sessions.set(len(self.store))

    def _open(self, model_name: str, session_id: str, kind: str, rpc: str):
        """(model name, model, session or None, position) for a call; the caller must release."""
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
            pos = Position(session.state, self.logits.get(session.session_id))
        else:
            pos = Position(model.initial_state(1)[0], None)
        self.batchers[model_name].active += 1  # this call steps until _release
        return model_name, model, session, pos

    def _save(self, session: Session | None, pos: Position) -> None:
        if session is not None:
            session.state = pos.state
            if pos.logits is not None:
                self.logits[session.session_id] = pos.logits

    def _release(self, name: str, session: Session | None) -> None:
        batcher = self.batchers[name]
        batcher.active -= 1
        if batcher.queue_depth():
            batcher.wake()  # one fewer caller for a waiting batch to wait for
        if session is not None:
            self.store.release(session)

    # -------------------------------------------------------------- text
    @staticmethod
    def start_id(model: ServedModel) -> int:
        tok = model.tokenizer
        if tok.bos_id is not None and tok.bos_id >= 0:
            return tok.bos_id
        for ch in ("\n", " "):
            enc = tok.encode(ch)
            if len(enc.ids) == 1 and enc.unknown_chars == 0:
                return int(enc.ids[0])
        return 0

    async def _feed(self, name: str, model: ServedModel, pos: Position, token: int,
                    session: Session | None) -> None:
        logits, state = await self.batchers[name].step(np.int64(token), pos.state)
        pos.state, pos.logits = state, logits
        self._save(session, pos)  # after every whole step: a cancelled call leaves it consistent

    async def _ensure_started(self, name, model, pos, session) -> None:
        if pos.logits is None:
            await self._feed(name, model, pos, self.start_id(model), session)

    async def score(self, model_name: str, session_id: str, text: str, per_char: bool):
        if not text:
            raise InvalidArgument("text must not be empty")
        if len(text) > self.limits.max_text:
            raise ResourceExhausted(
                f"text has {len(text)} characters; this server scores at most {self.limits.max_text} per call"
            )
        name, model, session, pos = self._open(model_name, session_id, "char", "Score")
        try:
            enc = model.tokenizer.encode(text)
            await self._ensure_started(name, model, pos, session)
            z_slots = [i for i, s in enumerate(model.meta.state_slots) if s.endswith(".z")]
            char_bits = np.empty(len(enc.ids))
            boundaries: list[list[str]] = [[] for _ in z_slots]
            for i, tok in enumerate(enc.ids):
                char_bits[i] = bits(pos.logits[None], np.array([tok]))[0]
                await self._feed(name, model, pos, int(tok), session)
                for b, slot in zip(boundaries, z_slots):
                    b.append("1" if pos.state[slot, 0] > 0.5 else "0")
            self.metrics.chars_scored.labels(name).inc(len(enc.ids))
            total = float(char_bits.sum())
            return {
                "bits_per_char": total / len(enc.ids),
                "total_bits": total,
                "num_chars": len(enc.ids),
                "bits": char_bits.astype(np.float32).tolist() if per_char else [],
                "unknown_chars": int(enc.unknown_chars),
                "boundaries": ["".join(b) for b in boundaries] if per_char else [],
            }
        finally:
            self._release(name, session)

    async def generate(self, model_name: str, session_id: str, prompt: str, max_chars: int,
                       temperature: float, top_k: int, top_p: float, seed: int | None,
                       stop: list[str], logprobs: bool) -> AsyncIterator[tuple[str, list[float], str]]:
        """Yields (text, bits, finish_reason) per generated character; finish_reason is "" until
        the last one ("LENGTH", "STOP_SEQUENCE" or "CANCELLED")."""
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
        name, model, session, pos = self._open(model_name, session_id, "char", "Generate")
        try:
            tok = model.tokenizer
            banned = tuple(i for i in (tok.unk_id, tok.bos_id, tok.pad_id) if i is not None and i >= 0)
            sampler = Sampler(temperature, top_k, top_p, seed, banned=banned)
            t0 = time.perf_counter()
            await self._ensure_started(name, model, pos, session)
            for t in tok.encode(prompt).ids:
                await self._feed(name, model, pos, int(t), session)
            out = ""
            for n in range(max_chars):
                if self.closing:
                    yield "", [], "CANCELLED"
                    return
                token = sampler(pos.logits)
                b = [float(bits(pos.logits[None], np.array([token]))[0])] if logprobs else []
                piece = tok.decode([token])
                await self._feed(name, model, pos, token, session)
                if n == 0:
                    self.metrics.first_char.labels(name).observe(time.perf_counter() - t0)
                self.metrics.chars_generated.labels(name).inc()
                out += piece
                eos = tok.eos_id is not None and token == tok.eos_id
                if eos or any(out.endswith(s) for s in stop):
                    yield piece, b, "STOP_SEQUENCE"
                    return
                yield piece, b, ("LENGTH" if n == max_chars - 1 else "")
        finally:
            self._release(name, session)

    # ------------------------------------------------------------- glimpses
    def glimpse_stream(self, model_name: str, session_id: str) -> "GlimpseStream":
        name, model, session, pos = self._open(model_name, session_id, "glimpse", "ClassifyGlimpses")
        return GlimpseStream(self, name, model, session, pos)


class GlimpseStream:
    """One ClassifyGlimpses call: glimpses in, class probabilities out, state carried."""

    def __init__(self, engine: Engine, name: str, model: ServedModel, session, pos: Position):
        self.engine, self.name, self.model, self.session, self.pos = engine, name, model, session, pos
        self.steps = 0

    async def push(self, pixels) -> tuple[int, list[float], int]:
        x = np.asarray(pixels, dtype=np.float32)
        if x.shape != (GLIMPSE_SIZE,) or not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise InvalidArgument(
                f"a glimpse is {GLIMPSE_SIZE} finite floats in [0, 1] (7x7, row-major); got "
                f"{x.size} values" + ("" if x.size != GLIMPSE_SIZE or np.isfinite(x).all() else " with NaN or infinity")
            )
        logits, state = await self.engine.batchers[self.name].step(x, self.pos.state)
        self.pos.state = state
        self.engine._save(self.session, self.pos)
        self.steps += 1
        self.engine.metrics.glimpses.labels(self.name).inc()
        lp = log_softmax(logits)
        p = np.exp(lp)
        return self.steps, p.astype(np.float32).tolist(), int(np.argmax(p))

    def close(self) -> None:
        self.engine._release(self.name, self.session)


__all__ = [
    "Aborted", "Engine", "FailedPrecondition", "GlimpseStream", "InvalidArgument", "Limits",
    "NotFound", "ResourceExhausted", "ServingError", "Unavailable",
]
