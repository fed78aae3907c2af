"""Advances the ready sessions of one model together: one batched step for all of them.

Every call that needs one recurrent step (a prompt character, a generated character, a scored
character, a glimpse) enqueues (input, state row) and awaits the result. A worker takes the
queue in arrival order, as Triton's sequence batcher does with its "oldest" strategy: once a
request is waiting it gathers more for at most `max_wait` seconds (or until `max_batch` are
ready), stacks them into one (B,) / (B, 49) input and one (B, S, H) state, runs the step graph
once on a worker thread (the event loop stays free), and hands each caller its row.

Streams re-enqueue as soon as their previous step resolves, so concurrent streams on one
model advance in lockstep batches. The engine counts the calls that are stepping (`active`);
once every one of them is waiting there is no company left to wait for and the batch runs at
once, so a lone stream never pays `max_wait`. A caller that is cancelled simply never reads its row.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

StepFn = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray]"]


class Batcher:
    def __init__(
        self,
        step: StepFn,
        *,
        max_batch: int = 64,
        max_wait: float = 0.002,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait}")
        self._step = step
        self.max_batch, self.max_wait = max_batch, max_wait
        self._on_batch = on_batch  # metrics hook: (batch size, seconds in the step graph)
        self._queue: deque[tuple[np.ndarray, np.ndarray, asyncio.Future, float]] = deque()
        self._ready = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"step-{name}")
        self._task: asyncio.Task | None = None
        self.steps_run = 0
        self.active = 0  # calls currently stepping on this model (the engine counts them)

    def wake(self) -> None:
        """Re-check the batch now (a caller left: one fewer to wait for)."""
        self._ready.set()

    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for *_, fut, _ in self._queue:
            if not fut.done():
                fut.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def step(self, inp: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One step for one sequence: inp (an id or a (49,) glimpse), state (S, H).
        Returns (logits (V,), new state (S, H))."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((inp, state, fut, time.monotonic()))
        self._ready.set()
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._ready.wait()
            # the oldest request waits at most max_wait for company
            deadline = self._queue[0][3] + self.max_wait if self._queue else 0.0
            while len(self._queue) < min(self.max_batch, max(self.active, 1)):
                delay = deadline - time.monotonic()
                if delay <= 0:
                    break
                self._ready.clear()
                try:
                    await asyncio.wait_for(self._ready.wait(), delay)
                except asyncio.TimeoutError:
                    break
            batch = []
            while self._queue and len(batch) < self.max_batch:
                item = self._queue.popleft()
                if not item[2].done():  # skip callers that were cancelled while queued
                    batch.append(item)
            if not self._queue:
                self._ready.clear()
            if not batch:
                continue
            inputs = np.stack([b[0] for b in batch])
            states = np.stack([b[1] for b in batch])
            t0 = time.perf_counter()
            try:
                logits, new_states = await loop.run_in_executor(self._executor, self._step, inputs, states)
            except Exception as exc:  # the graph failed: every caller of this batch gets it
                for *_, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            elapsed = time.perf_counter() - t0
            self.steps_run += 1
            if self._on_batch is not None:
                self._on_batch(len(batch), elapsed)
            for row, (*_, fut, _) in enumerate(batch):
                if not fut.done():
                    fut.set_result((logits[row], new_states[row]))
