"""What a shared session store costs the server per call and per checkpoint.

Times serving/durable.py's operations on sessions of the PTB model's size (state 3 x 600
float32, 51 logits) against a redis-server started for the run (or a file store in a temporary
folder): wall time, and CPU time in this process (the server's share; Redis's own CPU is not
counted). A call costs one acquire (lease + read) and one release (write + lease given back, in
one script); a running call costs one checkpoint every --session-checkpoint-s seconds.

    python bench/store_ops.py                  # redis and file, 2000 operations each
    python bench/store_ops.py --smoke          # a few operations (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time

import numpy as np

from serving.durable import DurableSessions
from serving.store import open_backend
from serving.testing.process import redis_server


def measure(url: str, n: int, sessions: int = 64) -> dict:
    rng = np.random.default_rng(0)
    state, logits = rng.random((3, 600), np.float32), rng.random(51, np.float32)
    store = DurableSessions(open_backend(url), {"ptb": "a" * 64})
    sids = [store.create("ptb", state, logits).session_id for _ in range(sessions)]
    clock = {op: [0.0, 0.0] for op in ("acquire", "checkpoint", "release")}  # wall, CPU seconds

    def timed(op, fn, *args):
        w, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        clock[op][0] += time.perf_counter() - w
        clock[op][1] += time.process_time() - c
        return out

    for i in range(n):
        s = timed("acquire", store.acquire, sids[i % sessions])
        timed("checkpoint", store.checkpoint, s, (state, logits, i))
        s.position = i
        timed("release", store.release, s)
    store.close()
    return {op: {"wall_us": w / n * 1e6, "cpu_us": c / n * 1e6} for op, (w, c) in clock.items()}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ops", type=int, default=2000, help="operations of each kind")
    ap.add_argument("--stores", nargs="+", default=["redis", "file"], choices=["redis", "file"])
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.ops = 20
    results = {}
    with contextlib.ExitStack() as stack:
        for store in args.stores:
            if store == "redis":
                url = stack.enter_context(redis_server())
            else:
                url = "file:" + stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="nlstm-sessions-")
                )
            results[store] = r = measure(url, args.ops)
            print(
                f"{store}: "
                + ", ".join(
                    f"{op} {v['wall_us']:.0f} us ({v['cpu_us']:.0f} us CPU)" for op, v in r.items()
                ),
                flush=True,
            )
    print(json.dumps({"ops": args.ops, "results": results}))


if __name__ == "__main__":
    main()
