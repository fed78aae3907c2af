"""The sequences the scheduler (serving/scheduler.py) advances: one per call, knowing what to
feed next and what to do with each step's row of logits and state.

`ScoreSequence` feeds the start symbol if fresh, then the text, scoring each character;
`GenerateSequence` feeds the start symbol and the prompt, then samples, emits and feeds
characters, timing its messages and keeping the state at their boundaries; `GlimpseSequence`
feeds glimpses as they arrive. While a `Streams` block (serving/streams.py) runs a
GenerateSequence, its counters and position live in the block's columns.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from serving.sampling import Sampler, bits

if TYPE_CHECKING:
    from serving.streams import Streams


class Sequence:
    """One call's sequence. Fields written by the scheduler thread: `state`, `logits` (always
    together, as `pos`), `finished`. The asyncio side may set `cancelled`."""

    def __init__(self, state: np.ndarray, logits: np.ndarray | None) -> None:
        self.pos = (state, logits)  # assigned as one tuple: readers never see half an update
        self.cancelled = False
        self.finished = False
        self.error: BaseException | None = None

    def prediction(self) -> np.ndarray:
        """The logits of the last step: what the next symbol is sampled or scored under. There
        is one before any symbol is: the start step's, or the session's."""
        logits = self.pos[1]
        assert logits is not None, "no step yet: the start symbol goes first"
        return logits

    def ready(self) -> bool:
        raise NotImplementedError

    def take_input(self):
        """The next input to step (called only when ready())."""
        raise NotImplementedError

    def advance(self, logits: np.ndarray, state: np.ndarray, post: list) -> None:
        """Take this sequence's row of the step; append callbacks for the asyncio side."""
        raise NotImplementedError

    def close(self, post: list) -> None:
        """Finished or cancelled: append the final callbacks."""


class ScoreSequence(Sequence):
    """Feeds the start symbol if fresh, then each character of the text, scoring each under
    the prediction made before it."""

    def __init__(
        self, state, logits, start_id: int, ids: np.ndarray, z_slots: list[int], done: Callable
    ) -> None:
        super().__init__(state, logits)
        self.start_id = start_id if logits is None else None
        self.ids = ids
        self.next = 0  # index of the next text id to feed
        self.bits = np.empty(len(ids))
        self.z_slots = z_slots
        self.boundaries = [bytearray() for _ in z_slots]
        self._done = done

    def ready(self) -> bool:
        return self.start_id is not None or self.next < len(self.ids)

    def take_input(self):
        if self.start_id is not None:
            token, self.start_id = self.start_id, None
            self._scored = False
            return np.int64(token)
        token = int(self.ids[self.next])
        self.bits[self.next] = bits(self.prediction()[None], np.array([token]))[0]
        self.next += 1
        self._scored = True
        return np.int64(token)

    def advance(self, logits, state, post) -> None:
        self.pos = (state, logits)
        if self._scored:
            for b, slot in zip(self.boundaries, self.z_slots, strict=True):
                b.append(49 if state[slot, 0] > 0.5 else 48)  # '1' / '0' after this character
        if not self.ready():
            self.finished = True

    def close(self, post) -> None:
        post.append(lambda: self._done(self))


class GenerateSequence(Sequence):
    """Feeds `feed` (the start symbol if fresh, then the prompt), then alternates: sample a
    character from the last prediction, emit it, feed it.

    Characters are emitted in messages: the first as soon as it is sampled, each later one
    when `interval` seconds have passed since the previous message (0: every character as it
    is made), carrying every character sampled meanwhile; the last (a finish reason set) and
    a cancelled stream's remainder go at once. The timing is kept here, on the scheduler
    thread, so that the event loop wakes once per message, not once per character.

    While a `Streams` block runs it, its counters live in the block's columns and its position
    is its row of the block's last step (`pos` reads it there).

    Message boundaries: each message carries `made`, the symbols generated up to its end, and
    `marks[made]` keeps (state, logits) after the step that fed a message's last character
    (`marks[0]`: after the prompt): where a session goes back to when the call ends before the
    next message is sent. The event loop forgets each boundary once it cannot be needed (a
    later message was sent, or coalesced with a later one before it went), so a stream holds a
    few. It costs a copy of the state per message, nothing per character."""

    _at: tuple[Streams, int] | None = None  # (block, row) while a Streams block runs this sequence
    # serving.prefix_cache.Recorder while a fresh sequence's prompt is fed (the engine sets it)
    recorder = None

    @property
    def pos(self) -> tuple[np.ndarray, np.ndarray | None]:
        at = self._at
        if at is None:
            return self._pos
        states, logits = at[0].out
        return states[at[1]], logits[at[1]]

    @pos.setter
    def pos(self, value: tuple[np.ndarray, np.ndarray | None]) -> None:
        self._pos = value

    def __init__(
        self,
        state,
        logits,
        feed: list[int],
        sampler: Sampler,
        max_chars: int,
        stop: list[str],
        logprobs: bool,
        texts: list[str],
        eos_id: int | None,
        emit: Callable,
        interval: float = 0.0,
        boundaries: bool = True,
    ) -> None:
        super().__init__(state, logits)
        self.feed: deque[int] = deque(feed)
        self.sampler = sampler
        self.max_chars = max_chars
        self.remaining = max_chars
        self.stop, self.logprobs, self.texts, self.eos_id = stop, logprobs, texts, eos_id
        self.tail = ""  # the end of the generated text, long enough to see a stop string
        self.keep = max((len(s) for s in stop), default=0)
        self._emit = emit  # emit(text, bits, finish_reason) on the asyncio side
        self.finish_reason = ""
        self.interval = interval
        self.due = 0.0  # time.monotonic() from which the next message may go
        self.pending: list[str] = []  # sampled characters not emitted yet
        self.pending_bits: list[float] = []
        # no start or prompt to feed: a session's position already predicts the next character
        self.wants_sample = not self.feed
        # made -> (state, logits) at message boundaries: set here, read and dropped by the event
        # loop (single dict operations are atomic); the state after the prompt first. None
        # (boundaries=False): a call without a session, which keeps nothing
        self.marks: dict[int, tuple] | None = {} if boundaries else None
        self._capture: int | None = 0  # `made` of the message whose boundary the next step makes
        self.prompt_fed = not self.feed
        if self.prompt_fed:
            if self.marks is not None:
                self.marks[0] = (state, logits)
            self._capture = None

    def ready(self) -> bool:
        return bool(self.feed) or self.wants_sample

    def take_input(self):
        return np.int64(self.feed.popleft())

    def advance(self, logits, state, post) -> None:
        self.pos = (state, logits)
        if self.recorder is not None and not self.recorder.stepped(state, logits):
            self.recorder = None  # the prompt is in: the prefix-state cache has its checkpoints
        if self.feed:  # still feeding the start symbol or the prompt
            return
        if self._capture is not None:  # this step fed a message's last character (or the prompt's)
            if self.marks is not None:
                self.marks[self._capture] = (state.copy(), logits.copy())
            self._capture = None
            self.prompt_fed = True
        if self.finish_reason:  # the last character is in the state now
            self.finished = True
        else:
            self.wants_sample = True  # sampled at the start of the next step

    def take_sample(
        self,
        token: int,
        bits: float | None,
        post: list,
        now: float | None = None,
        spacing: float = 0.0,
    ) -> None:
        """The scheduler sampled `token` for this sequence at time.monotonic() `now` (None: read
        the clock): emit it (now or with the next message) and feed it next. `spacing`: the
        least time between this stream's messages that the model's message budget allows (the
        stream's own interval applies when it is longer)."""
        if now is None:
            now = time.monotonic()
        self.wants_sample = False
        self.remaining -= 1
        text = self.texts[token]
        if token == self.eos_id or (self.keep and self.stopped(text)):
            self.finish_reason = "STOP_SEQUENCE"
        if self.remaining == 0 and not self.finish_reason:
            self.finish_reason = "LENGTH"
        self.pending.append(text)
        if bits is not None:
            self.pending_bits.append(bits)
        if self.finish_reason or now >= self.due:
            self._flush(self.finish_reason, post, self.max_chars - self.remaining)
            self.due = now + max(self.interval, spacing)
        self.feed.append(token)  # fed so the state (and a session) includes it

    def stopped(self, text: str) -> bool:
        """`text` follows the generated text: does the text now end with a stop string?"""
        self.tail = (self.tail + text)[-self.keep :]
        return any(self.tail.endswith(s) for s in self.stop)

    def _flush(self, reason: str, post: list, made: int | None) -> None:
        """Send the pending characters as one message; `made`: symbols generated up to its end
        (None: the prompt was not all fed). The step that feeds its last character marks it."""
        text, b, emit = "".join(self.pending), self.pending_bits, self._emit
        self.pending, self.pending_bits = [], []
        self._capture = made
        post.append(lambda: emit(text, b, reason, made))

    def mark(self, made: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(state, logits) after the prompt and `made` generated symbols, if that is a message
        boundary still kept; None when the prompt was never all fed."""
        m = None if self.marks is None else self.marks.get(made)
        if m is not None and len(m) == 3:  # (rows' states, rows' logits, row) from a Streams block
            return m[0][m[2]], m[1][m[2]]
        return m

    def forget(self, made: int) -> None:
        """The boundary at `made` will not be needed (a later message was sent, or this one
        was coalesced with a later one)."""
        if self.marks is not None:
            self.marks.pop(made, None)

    def close(self, post) -> None:
        # A failed step: the characters not sent yet are dropped (the step did not feed the
        # last one, so no message boundary holds them); the error follows what was sent.
        if self.error is None and not self.finish_reason:  # cancelled, or the server is draining
            if not self.prompt_fed:  # the session will not change
                self._flush("CANCELLED", post, None)
            else:  # with the characters made since the last message, all fed
                made = self.max_chars - self.remaining
                if self.marks is not None:
                    state, logits = self.pos
                    self.marks[made] = (state.copy(), None if logits is None else logits.copy())
                self._flush("CANCELLED", post, made)
        post.append(lambda: self._emit(None, None, None, None))  # end of stream


class GlimpseSequence(Sequence):
    def __init__(self, state) -> None:
        super().__init__(state, None)
        self.inputs: deque = deque()  # (pixels, callback(logits)) appended by the asyncio side

    def ready(self) -> bool:
        return bool(self.inputs)

    def take_input(self):
        pixels, self._reply = self.inputs.popleft()
        return pixels

    def advance(self, logits, state, post) -> None:
        self.pos = (state, logits)
        reply = self._reply
        post.append(lambda: reply(logits, state))
