"""Continuous batching: one thread per model advances every ready sequence in one step.

A call (Generate, Score, a glimpse stream) becomes a `Sequence` the scheduler owns until it
finishes: it knows what to feed next (the start symbol, prompt characters, generated or scored
characters, glimpses as they arrive) and what to do with the step's logits. The scheduler
thread loops: take the ready sequences (oldest first, at most `max_batch`; those left over go
first next time), stack their inputs and (S, H) states into one (B,) / (B, 49) input and one
(B, S, H) state, run the step graph once, hand each sequence its row, sample the next
character of every generating sequence at once (numpy over the batch), and post everything
the asyncio side must see in ONE callback. New calls join at the next step, as in TGI's router
or Triton's sequence batcher ("oldest" strategy). When a step's batch is the last one's (the
same sequences in the same order: the steady state of concurrent streams), the last step's
(B, S, H) state and (B, V) logits are fed back as they are instead of being gathered row by
row; and when every sequence in it is generating with plain temperature sampling or greedily,
a `Streams` block (serving/streams.py) takes over their per-character bookkeeping in arrays, so
that the Python between two steps no longer grows with the number of streams.

What each kind of call feeds and keeps is its sequence's (serving/sequences.py). Generate
messages are timed here too (GenerateSequence): a stream's characters collect on
this thread and go to the event loop once per `interval` (or further apart when the model's
message budget, `message_rate`, is shared by many streams), so the loop wakes once per
message rather than once per character. Callbacks reach the loop through a messenger thread,
during the step graph call (see Scheduler.__init__). A step's messages are posted after the
step that feeds their last character, and each message's sequence keeps a copy of its state
at that boundary (`marks`), so that a call that ends early can leave its session holding
exactly what the client was sent; a failed step's messages are never posted.

If some sequences are active but not ready (a glimpse stream whose next glimpse is still on
the network), the scheduler waits at most `max_wait` seconds for them before stepping the
others: the small bounded wait that fills a batch.

Keeping the per-character work in this thread, off the event loop and without a future per
step, is what lets one stream run near the raw step rate (bench/serve_load.py).
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from serving.sampling import LOG2E, draw, greedy, log_softmax
from serving.sequences import GenerateSequence, GlimpseSequence, ScoreSequence, Sequence
from serving.streams import Batch, Streams

log = logging.getLogger("nlstm.serving")

# the longest time between two messages of a stream (--stream-interval-ms, or the message
# budget shared by many streams): beyond that a stream looks stalled to its reader
MAX_SPACING = 10.0


class Scheduler:
    def __init__(
        self,
        step: Callable,
        *,
        max_batch: int = 64,
        max_wait: float = 0.002,
        name: str = "",
        post: Callable[[Callable[[], object]], object],
        on_batch: Callable[[int, float], None] | None = None,
        message_rate: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait}")
        if not message_rate >= 0:  # NaN fails too
            raise ValueError(
                f"message_rate must be >= 0 messages per second (0: no budget), got {message_rate}"
            )
        self._step = step
        self.max_batch, self.max_wait = max_batch, max_wait
        # the Generate messages per second all streams together may send (0: no budget): with n
        # streams running, each stream's messages are at least n / message_rate seconds apart
        self.message_rate = message_rate
        self._generating = 0  # Generate sequences running
        self._post = post  # runs a callable on the asyncio loop (call_soon_threadsafe)
        # The messenger thread hands the scheduler's callbacks to the event loop. Waking the loop
        # is a system call that lets go of the GIL, and the loop, once it has it, keeps it for
        # all the messages it then sends; from the scheduler thread that would hold the next step
        # back. The messenger runs when the scheduler lets go of the GIL anyway: in the step graph.
        self._outbox: deque[list] = deque()
        self._outbox_ready = threading.Event()
        self._outbox_closed = False
        self._messenger = threading.Thread(
            target=self._deliver, name=f"messenger-{name}", daemon=True
        )
        self._messenger.start()
        self._on_batch = on_batch  # (batch size, seconds in the step graph)
        self._waiting = 0  # sequences ready for the last step that did not fit in its batch
        self._seqs: list[Sequence] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._changed = (
            False  # a call was added, poked or cancelled since the scheduler last looked
        )
        self.steps_run = 0
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{name}", daemon=True)
        self._thread.start()

    def add(self, seq: Sequence) -> None:
        with self._cond:
            self._seqs.append(seq)
            self._changed = True
            self._cond.notify()

    def poke(self) -> None:
        """Something changed on the asyncio side (an input arrived, a call was cancelled)."""
        with self._cond:
            self._changed = True
            self._cond.notify()

    def active(self) -> int:
        """Sequences (calls) this scheduler runs."""
        return len(self._seqs)

    def waiting(self) -> int:
        """Sequences that were ready for the last step but did not fit in its batch (0 once
        the scheduler idles)."""
        return self._waiting

    def cancel(self, kind: type[Sequence]) -> None:
        """Cancel every active sequence of `kind` (the Generate calls when the server drains)."""
        with self._cond:
            for s in self._seqs:
                if isinstance(s, kind):
                    s.cancelled = True
            self._changed = True
            self._cond.notify()

    def stop(self) -> None:
        """Stop stepping; the callbacks already made (the last messages) still reach the loop."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(10)
        if (
            self._thread.is_alive()
        ):  # a step longer than 10 s: the messenger stays for its callbacks
            log.warning("scheduler %s did not stop within 10 s", self._thread.name)
            return
        self._outbox_closed = True
        self._outbox_ready.set()
        self._messenger.join(10)

    def _take_batch(self) -> list[Sequence] | None:
        """Under the lock: drop finished sequences, wait for ready ones; None when stopping."""
        waited_since = None
        while True:
            post: list = []
            keep, generating = [], 0
            for s in self._seqs:
                if s.finished or s.cancelled:
                    s.close(post)
                else:
                    keep.append(s)
                    generating += isinstance(s, GenerateSequence)
            self._seqs, self._generating = keep, generating
            if post:
                self._post_all(post)
            if self._stopped:
                return None
            ready = [s for s in self._seqs if s.ready()]
            if ready and len(ready) < min(len(self._seqs), self.max_batch) and self.max_wait > 0:
                now = time.monotonic()
                waited_since = waited_since or now
                if now - waited_since < self.max_wait:  # some are busy elsewhere: a short wait
                    self._cond.wait(self.max_wait - (now - waited_since))
                    continue
            if ready:
                self._changed = False  # everything added or poked so far is in this look
                batch = ready[: self.max_batch]
                self._waiting = len(ready) - len(batch)
                if len(ready) > self.max_batch:  # the ones left go first next time
                    chosen = set(map(id, batch))
                    self._seqs = [s for s in self._seqs if id(s) not in chosen] + batch
                return batch
            self._waiting = 0
            self._cond.wait()

    def _loop(self) -> None:
        last: tuple[Batch, np.ndarray, np.ndarray] | None = None  # batch, states, logits
        streams: Streams | None = None
        batch: Batch | None
        while True:
            with self._cond:
                if streams is not None and (self._changed or streams.ended or self._stopped):
                    streams.release()
                    streams = None
                self._changed = False
                # a running block keeps its batch: nothing changed, every sequence in it is ready
                batch = streams.seqs if streams is not None else self._take_batch()
            if batch is None:
                return
            post: list = []
            # The steady state: the same sequences as the last step, in the same order. Their
            # positions are then the rows of that step's outputs, which are used as they are
            # instead of stacked again.
            same = (
                last
                if last is not None
                and (
                    batch is last[0]
                    or (len(batch) == len(last[0]) and all(map(operator.is_, batch, last[0])))
                )
                else None
            )
            try:
                spacing = (
                    min(self._generating / self.message_rate, MAX_SPACING)
                    if self.message_rate
                    else 0.0
                )
                if streams is None and same is not None and Streams.fits(batch):
                    streams = Streams(batch, same[1], same[2], spacing)
                    batch = streams.seqs
                if streams is not None:
                    assert last is not None  # a block runs on from a step that succeeded
                    inputs, states = streams.sample(time.monotonic(), post), last[1]
                else:
                    # sample the next character of every generating sequence at once; it is fed
                    # in this same step
                    sampling = [
                        s for s in batch if isinstance(s, GenerateSequence) and s.wants_sample
                    ]
                    self._sample(
                        sampling,
                        post,
                        same[2] if same is not None and len(sampling) == len(batch) else None,
                        spacing,
                    )
                    inputs = np.stack([s.take_input() for s in batch])
                    states = same[1] if same is not None else np.stack([s.pos[0] for s in batch])
                t0 = time.perf_counter()
                logits, new_states = self._step(inputs, states)
                elapsed = time.perf_counter() - t0
                if streams is not None:
                    streams.stepped(new_states, logits)
                else:
                    for s, row_logits, row_state in zip(batch, logits, new_states, strict=True):
                        s.advance(row_logits, row_state, post)
                last = (batch, new_states, logits)
            except Exception as exc:  # a failing graph fails the calls in it, not the server
                log.exception("step failed for a batch of %d", len(batch))
                # its messages carry characters this step did not feed: they are never sent
                post = []
                if streams is not None:
                    streams.release()
                    streams = None
                for s in batch:
                    s.error, s.finished = exc, True
                elapsed, last = 0.0, None
            self.steps_run += 1
            if self._on_batch is not None:
                self._on_batch(len(batch), elapsed)
            if post:
                self._post_all(post)

    def _sample(
        self,
        seqs: list[GenerateSequence],
        post: list,
        logits: np.ndarray | None = None,
        spacing: float = 0.0,
    ) -> None:
        """The next character of every generating sequence, vectorised over the batch where
        the sampling settings allow (greedy and plain temperature rows). `logits`: their
        predictions stacked already (the last step's output), else gathered here."""
        if not seqs:
            return
        if logits is None:
            logits = np.stack([s.prediction() for s in seqs])
        tokens = np.empty(len(seqs), dtype=np.int64)
        plain, greedy_rows = [], []  # vectorised below
        for i, s in enumerate(seqs):
            if s.sampler.plain:
                plain.append(i)
            elif s.sampler.temperature == 0:
                greedy_rows.append(i)
            else:  # top-k or top-p: one row at a time
                tokens[i] = s.sampler(logits[i])
        banned = seqs[0].sampler.banned  # the model's: the same for every sequence
        if plain:
            temperature = np.array([seqs[i].sampler.temperature for i in plain])
            u = np.array([seqs[i].sampler.next_uniform() for i in plain])
            tokens[plain] = draw(logits[plain], temperature, u, banned)
        if greedy_rows:
            tokens[greedy_rows] = greedy(logits[greedy_rows], banned)
        lp = log_softmax(logits) if any(s.logprobs for s in seqs) else None
        now = time.monotonic()
        for i, (s, token) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            b = float(-lp[i, token] * LOG2E) if lp is not None and s.logprobs else None
            s.take_sample(token, b, post, now, spacing)

    def _post_all(self, callbacks: list) -> None:
        """Hand callbacks to the messenger thread, which runs them on the event loop in order."""
        self._outbox.append(callbacks)
        self._outbox_ready.set()

    def _deliver(self) -> None:
        while True:
            self._outbox_ready.wait()
            self._outbox_ready.clear()
            batches = []
            while self._outbox:
                batches.append(self._outbox.popleft())
            if batches:

                def run_all(batches=batches):
                    for callbacks in batches:
                        for cb in callbacks:
                            try:
                                cb()
                            except (
                                Exception
                            ):  # one call's failure must not keep the others' messages
                                log.exception("a scheduler callback failed")

                try:
                    self._post(run_all)
                except RuntimeError:  # the event loop is closed: there is nobody left to tell
                    log.warning(
                        "the event loop closed before %d callbacks reached it",
                        sum(map(len, batches)),
                    )
            if self._outbox_closed and not self._outbox:
                return


# the sequences are defined in serving/sequences.py and Streams in serving/streams.py; the
# scheduler is where callers find them
__all__ = [
    "MAX_SPACING",
    "GenerateSequence",
    "GlimpseSequence",
    "Scheduler",
    "ScoreSequence",
    "Sequence",
    "Streams",
]
