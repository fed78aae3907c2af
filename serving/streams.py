"""The steady state of generation in columns: a `Streams` block runs the same generating
sequences step after step (serving/scheduler.py hands it a batch that is the last step's, every
sequence in it sampling with a plain temperature or greedily), keeping their per-character
bookkeeping in arrays, so that the Python between two steps no longer grows with the number of
streams. What a block does is what the sequences (serving/sequences.py) would do step by step.
"""

from __future__ import annotations

from collections import abc
from typing import TypeGuard

import numpy as np

from serving.sampling import LOG2E, draw, greedy, log_softmax
from serving.sequences import GenerateSequence, Sequence

# A step's sequences, row i of its inputs and outputs being sequence i. Read-only here, so that
# a block's sequences (all generating) are one too.
Batch = abc.Sequence[Sequence]


class Streams:
    """The steady state of generation in columns: the same generating sequences step after
    step, each sampling its next character (with a plain temperature, or greedily) from the
    last step's logits and feeding it in the same step.

    For up to `BLOCK` steps their per-character bookkeeping lives here as arrays: the ids
    sampled, the uniform draws taken ahead from each request's stream, when each stream's
    next message is due. Per sequence, Python runs only when its message goes (once per
    interval), for a stream with stop strings, and at `release`, which writes everything back
    to the sequences: the scheduler releases the block when anything changes (a call arrives
    or is cancelled, a stream ends) or the block is full. The text is the one the sequences
    would make step by step (tests/test_scheduler_streams.py)."""

    BLOCK = 128  # steps a block runs at most: draws taken ahead, ids kept

    @staticmethod
    def fits(batch: Batch) -> TypeGuard[abc.Sequence[GenerateSequence]]:
        """Can a block run `batch` (all of its sequences generating, each about to sample)?"""
        shared = set()  # what the block keeps once for all rows: the id texts, eos, banned ids
        for s in batch:
            if type(s) is not GenerateSequence or s.feed or not s.wants_sample or s.finish_reason:
                return False
            if not (
                s.sampler.plain or s.sampler.temperature == 0
            ):  # top-k and top-p: one row at a time
                return False
            shared.add((id(s.texts), s.eos_id, s.sampler.banned))
        return len(shared) == 1

    def __init__(
        self,
        seqs: abc.Sequence[GenerateSequence],
        states: np.ndarray,
        logits: np.ndarray,
        spacing: float = 0.0,
    ) -> None:
        self.seqs = seqs
        self.out = (states, logits)  # the last step's outputs: row i is seqs[i]'s position
        first = seqs[0]
        self.texts, self.eos_id, self.banned = first.texts, first.eos_id, first.sampler.banned
        self.remaining = np.array([s.remaining for s in seqs])
        self.made = [
            s.max_chars - s.remaining for s in seqs
        ]  # row i: symbols made before the block
        # a block ends at the step where the first stream reaches max_chars
        self.steps = min(self.BLOCK, int(self.remaining.min()))
        temperature = np.array([s.sampler.temperature for s in seqs])
        self.plain, self.greedy = np.flatnonzero(temperature > 0), np.flatnonzero(temperature == 0)
        self.temperature = temperature[self.plain]
        self.u = np.zeros((len(seqs), self.steps))
        for i in self.plain.tolist():
            self.u[i] = seqs[i].sampler.uniforms(self.steps)
        self.ids = np.empty((len(seqs), self.steps), dtype=np.int64)
        self.bits = np.empty((len(seqs), self.steps)) if any(s.logprobs for s in seqs) else None
        self.stops = [i for i, s in enumerate(seqs) if s.keep]
        self.due = np.array([s.due for s in seqs])
        self.gap = np.maximum(
            [s.interval for s in seqs], spacing
        )  # least time between a row's messages
        self.next_due = float(self.due.min())
        self.sent = [0] * len(seqs)  # row i: ids[i, :sent[i]] have gone to the sequence
        self.reasons: dict[int, str] = {}  # row -> finish reason
        self.flushed: list[
            int
        ] = []  # rows that sent a message this step (their boundary is its output)
        self.k = 0  # steps sampled
        self.ended = False  # a stream finished, or the block is full: release it
        for i, s in enumerate(seqs):
            s._at = (self, i)

    def sample(self, now: float, post: list) -> np.ndarray:
        """Sample every stream's next character from the last step's logits at time.monotonic()
        `now`; send the messages that are due. Returns the ids to feed."""
        k, logits = self.k, self.out[1]
        if len(self.plain) == len(self.seqs):
            ids = draw(logits, self.temperature, self.u[:, k], self.banned)
        else:
            ids = np.empty(len(self.seqs), dtype=np.int64)
            if len(self.plain):
                ids[self.plain] = draw(
                    logits[self.plain], self.temperature, self.u[self.plain, k], self.banned
                )
            ids[self.greedy] = greedy(logits[self.greedy], self.banned)
        self.ids[:, k] = ids
        if self.bits is not None:
            self.bits[:, k] = -log_softmax(logits)[np.arange(len(ids)), ids] * LOG2E
        self.k = k = k + 1
        reasons = self.reasons
        tokens = ids.tolist()  # Python ints: cheaper to test than the array's elements
        if self.eos_id in tokens:
            for i, token in enumerate(tokens):
                if token == self.eos_id:
                    reasons[i] = "STOP_SEQUENCE"
        for i in self.stops:
            if i not in reasons and self.seqs[i].stopped(self.texts[tokens[i]]):
                reasons[i] = "STOP_SEQUENCE"
        if k == self.steps:
            for i in np.flatnonzero(self.remaining == k).tolist():
                reasons.setdefault(i, "LENGTH")
            self.ended = True
        if reasons:
            self.ended = True
        if now >= self.next_due or reasons:
            flushed = sorted(set(np.flatnonzero(self.due <= now).tolist()) | reasons.keys())
            for i in flushed:
                self._give(i, reasons.get(i, ""), post)
                self.due[i] = now + self.gap[i]
            self.next_due = float(self.due.min())
            self.flushed = flushed
        return ids

    def stepped(self, states: np.ndarray, logits: np.ndarray) -> None:
        """The step fed the ids sampled: its outputs are the streams' positions now, the
        streams that sent a message mark its boundary, and a stream that sampled its last
        character is finished (as GenerateSequence.advance)."""
        self.out = (states, logits)
        if self.flushed:
            seqs = self.seqs
            rows = [i for i in self.flushed if seqs[i].marks is not None]
            self.flushed = []
            # one copy of the rows that sent a message, not a view of the whole batch's output
            # (which marks would keep alive) nor a copy per row (64 of them: 0.17 ms a step);
            # every row (interval 0): a plain copy, twice as fast as gathering them
            every = len(rows) == len(seqs)
            if rows:
                row_states, row_logits = (
                    (states.copy(), logits.copy()) if every else (states[rows], logits[rows])
                )
            for j, i in enumerate(rows):
                s = seqs[i]
                # rows: the streams keeping marks that sent a message (_flush set _capture)
                assert s.marks is not None and s._capture is not None
                s.marks[s._capture] = (row_states, row_logits, i if every else j)  # read by mark()
                s._capture = None
        for i in self.reasons:
            self.seqs[i].finished = True

    def _give(self, i: int, reason: str | None, post: list) -> None:
        """Hand row i's characters made since the last hand-over to its sequence, and send them
        as a message with `reason` (None: keep them pending)."""
        s, start = self.seqs[i], self.sent[i]
        if start < self.k:
            s.pending.append(
                "".join(map(self.texts.__getitem__, self.ids[i, start : self.k].tolist()))
            )
            if s.logprobs:
                assert self.bits is not None  # kept when any row wants logprobs
                s.pending_bits.extend(self.bits[i, start : self.k].tolist())
            self.sent[i] = self.k
        if reason is not None:
            s._flush(reason, post, self.made[i] + self.k)

    def release(self) -> None:
        """Write the block back to its sequences (each then continues step by step, or in a new
        block) and end it. Every id sampled has been fed, unless the step failed."""
        states, logits = self.out
        for i, s in enumerate(self.seqs):
            self._give(i, None, [])
            s.remaining = int(self.remaining[i]) - self.k
            s.due = float(self.due[i])
            if s.sampler.temperature > 0:
                s.sampler.unread(self.u[i, self.k :])
            if i in self.reasons:
                s.finish_reason, s.finished = self.reasons[i], True
            s.pos = (states[i], logits[i])
            s._at = None
        self.seqs = []
