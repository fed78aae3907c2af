"""The scheduler's own cost: CPU time per step of N generating streams over a step graph that
costs nothing (fixed logits, the state passed through), in one process, without gRPC.

What it isolates is the Python around the step graph: sampling in columns (Streams), message
timing, and the message boundaries a call on a session keeps (a copy of the rows that sent a
message, so that a call that ends early leaves its session holding exactly what was sent).
Each configuration runs with boundaries (calls on sessions) and without (calls without one);
CPU time (all threads of the process) is less sensitive than wall time to a busy machine.

    python bench/scheduler_overhead.py                      # 64 and 1 streams, interval 0 and 50 ms
    PYTHONPATH=../old python bench/scheduler_overhead.py    # another checkout's scheduler
    python bench/scheduler_overhead.py --smoke              # a second or two (CI)

A checkout from before message boundaries runs once per configuration, labelled so.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import time

import numpy as np

from serving.sampling import Sampler
from serving.scheduler import GenerateSequence, Scheduler

S, H, V = 3, 600, 50  # the PTB model's state and vocabulary


def run(streams: int, chars: int, interval: float, boundaries: bool | None) -> float:
    """CPU microseconds per step; boundaries None: the scheduler has no such option."""
    texts = [chr(97 + i % 26) for i in range(V)]
    logits = {}

    def step(inputs, states):
        if len(inputs) not in logits:
            logits[len(inputs)] = (
                np.random.default_rng(0).standard_normal((len(inputs), V)).astype(np.float32)
            )
        return logits[len(inputs)], states

    async def main() -> float:
        loop = asyncio.get_running_loop()
        sched = Scheduler(step, max_batch=64, max_wait=0.0, post=loop.call_soon_threadsafe)
        done = [loop.create_future() for _ in range(streams)]
        seqs: list[GenerateSequence] = []

        def emitter(i):
            sent = [0]

            def emit(text, *rest):  # as the engine: forget the boundary before the last message
                if text is None:
                    done[i].set_result(None)
                elif boundaries and rest[2] is not None:
                    if rest[2] != sent[0]:
                        seqs[i].forget(sent[0])
                    sent[0] = rest[2]

            return emit

        extra = {} if boundaries is None else {"boundaries": boundaries}
        t0, steps0 = time.process_time(), sched.steps_run
        for i in range(streams):
            seqs.append(
                GenerateSequence(
                    np.zeros((S, H), np.float32),
                    None,
                    [1, 2, 3],
                    Sampler(1.0, seed=i),
                    chars,
                    [],
                    False,
                    texts,
                    None,
                    emitter(i),
                    interval=interval,
                    **extra,
                )
            )
            sched.add(seqs[-1])
        await asyncio.gather(*done)
        cpu, steps = time.process_time() - t0, sched.steps_run - steps0
        await loop.run_in_executor(None, sched.stop)
        return cpu / steps * 1e6

    return asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--streams", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--chars", type=int, default=2000, help="characters per stream")
    ap.add_argument("--interval-ms", type=float, nargs="+", default=[0.0, 50.0])
    ap.add_argument(
        "--repeats", type=int, default=5, help="runs per configuration; the least CPU counts"
    )
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.streams, args.chars, args.interval_ms, args.repeats = [4], 200, [0.0], 1
    has_option = "boundaries" in inspect.signature(GenerateSequence.__init__).parameters
    results = []
    for n in args.streams:
        for interval in args.interval_ms:
            for boundaries in (True, False) if has_option else (None,):
                us = min(
                    run(n, args.chars, interval / 1000, boundaries) for _ in range(args.repeats)
                )
                label = {
                    True: "with boundaries",
                    False: "without",
                    None: "(no boundaries in this code)",
                }[boundaries]
                print(
                    f"streams {n:3d} interval {interval:g} ms {label:28s} "
                    f"{us:8.1f} us of CPU per step"
                )
                results.append(
                    {
                        "streams": n,
                        "interval_ms": interval,
                        "boundaries": boundaries,
                        "cpu_us_per_step": us,
                    }
                )
    print(json.dumps({"chars": args.chars, "repeats": args.repeats, "results": results}))


if __name__ == "__main__":
    main()
