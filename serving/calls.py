"""What one running call is made of, between the engine's coroutine and the scheduler's
thread: a Generate's sequence built from its request (`generate_sequence`, which the local
backend `nlstm generate --backend onnx` shares, so that a seed gives the server's text), the
mailbox its characters arrive in, a ClassifyGlimpses stream (`GlimpseStream`), and what the
checkpoint task of a shared session store needs of a running call (`Call`).

The engine (serving/engine.py) opens and finishes calls on sessions; these pieces only carry a
call's data. No gRPC, no torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from serving.errors import ResourceExhausted
from serving.requests import GenerateParams, GlimpseParams
from serving.sampling import Sampler, log_softmax
from serving.sequences import GenerateSequence, GlimpseSequence, Sequence

if TYPE_CHECKING:
    from serving.engine import Engine
    from serving.sessions import Session

# What a call leaves in its session: (state, logits, position).
Keep = tuple[np.ndarray, np.ndarray | None, int]


def generate_sequence(
    p: GenerateParams,
    tok,
    texts: list[str],
    state: np.ndarray,
    logits: np.ndarray | None,
    feed: list[int],
    emit: Callable,
    *,
    interval: float = 0.0,
    boundaries: bool = True,
) -> GenerateSequence:
    """The scheduler's sequence for Generate request `p` on a model with tokenizer `tok` and
    id texts `texts` (id_texts(tok)): from (state, logits), `feed` first (the start symbol if
    fresh, then the prompt's ids), characters to emit(text, bits, finish_reason, made)."""
    sampler = Sampler(p.temperature, p.top_k, p.top_p, p.seed, banned_ids(tok))
    return GenerateSequence(
        state,
        logits,
        feed,
        sampler,
        p.max_chars,
        list(p.stop),
        p.logprobs,
        texts,
        tok.eos_id,
        emit,
        interval=interval,
        boundaries=boundaries,
    )


def id_texts(tok) -> list[str]:
    """Each id's text, decoded once (generation emits one id per character); markers and the
    unknown piece are empty."""
    special = {
        i for i in (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) if i is not None and i >= 0
    }
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
    """One ClassifyGlimpses call: glimpses in, class probabilities out, state carried. The
    session keeps the glimpses whose answers were sent: the caller says so with `sent()`."""

    def __init__(self, engine: Engine, name: str, session, seq: GlimpseSequence) -> None:
        self.engine, self.name, self.session, self.seq = engine, name, session, seq
        self.steps = 0
        self.base = session.position if session is not None else 0
        self._answer: Keep | None = None  # (state, logits, position) after the last answer
        self._sent: Keep | None = None  # the same after the last answer sent

    async def push(self, glimpse: GlimpseParams) -> tuple[int, list[float], int, int]:
        """Step the stream on one glimpse (checked by GlimpseParams.from_pb): (step,
        probabilities, predicted class, position)."""
        if self.steps >= self.engine.limits.max_glimpses:
            raise ResourceExhausted(
                f"this stream has sent {self.steps} glimpses, the most one stream may send; "
                "continue in a new stream on the same session"
            )
        x = glimpse.pixels
        loop = asyncio.get_running_loop()
        reply = loop.create_future()

        def answer(*out) -> None:  # (logits, state), on the event loop
            if not reply.done():  # not cancelled meanwhile
                reply.set_result(out)

        self.seq.inputs.append((x, answer))
        self.engine.schedulers[self.name].poke()
        logits, state = await reply
        self.steps += 1
        self._answer = (state, logits, self.base + self.steps)
        self.engine.metrics.glimpses.labels(self.name).inc()
        p = np.exp(log_softmax(logits))
        return self.steps, p.astype(np.float32).tolist(), int(np.argmax(p)), self.base + self.steps

    def sent(self) -> None:
        """The answer to the last glimpse went out: the session will keep that glimpse."""
        self._sent = self._answer

    async def close(self) -> None:
        # Nothing more will come. Not marked finished: _finish marks it cancelled and wakes the
        # scheduler, which drops it now (a stream marked finished here stayed in the scheduler,
        # and in nlstm_active_sequences, until some other call woke it).
        await self.engine._finish(self.name, self.session, self.seq, self._sent)


@dataclass
class Call:
    """A running call on a session in a shared store (what the checkpoint task needs)."""

    name: str
    session: Session
    seq: Sequence
    keep: Callable[[], Keep | None]  # what the session would hold if the call ended now
