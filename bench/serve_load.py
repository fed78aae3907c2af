"""Serving throughput: N concurrent Generate streams against a real `nlstm serve` process.

In one run:
  1. the raw onnxruntime step rate of the same model at batch N and at batch 1, measured in a
     subprocess that never imports torch (char-steps/s = batch / step time), right before and
     right after the server's runs at that batch size, and averaged (the machine's speed drifts);
  2. a server process (`nlstm serve --port 0`), and N concurrent Generate streams for
     --seconds: aggregate characters/s, and p50/p99 of the time between characters (time
     between stream messages divided by the characters they carry);
and prints the ratio of (2) to (1) for N streams and for one stream.

    python bench/serve_load.py --models exported/ --model ptb-nlstm --streams 64 --seconds 20
    python bench/serve_load.py --smoke            # a tiny random model, a few seconds (CI)

Without --models, a random model of the paper's PTB size (NLSTM 2x600, 50 symbols; --hidden
to change) is exported to a temporary folder first. The client shares the machine with the
server: on a 2-core machine it takes part of the CPU the server would otherwise use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _server import REPO, Server, export_random, readme_lines

# the goals: the server's chars/s over the raw step rate at the same batch size
GOALS = {64: 0.8, 1: 0.7}

RAW_RATE = r"""
import json, sys, time
import numpy as np
from serving.runtime import load_model
folder, name, batch, seconds, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
m = load_model(f"{folder}/{name}", providers="cpu", intra_op_threads=threads or None)
state = m.initial_state(batch)
x = np.zeros(batch, np.int64)
# check=False: the step the server's scheduler runs (it builds its inputs itself)
for _ in range(20):
    _, state = m.step(x, state, check=False)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    _, state = m.step(x, state, check=False)
    n += 1
dt = (time.perf_counter() - t0) / n
print(json.dumps({"step_s": dt, "char_steps_per_s": batch / dt, "torch": "torch" in sys.modules}))
"""


def raw_rate(folder: Path, name: str, batch: int, seconds: float, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", RAW_RATE, str(folder), name, str(batch), str(seconds), str(threads)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["torch"], "the raw-rate process must not load torch"
    return result


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _step_seconds(server: Server, model: str) -> float:
    return server.metric("nlstm_step_duration_seconds_sum", model=model)


async def load(port: int, model: str, streams: int, seconds: float) -> dict:
    import grpc

    from serving.api.nlstm.v1 import inference_pb2 as pb
    from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc

    gaps: list[float] = []
    chars = 0
    end = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def one(i: int):
            nonlocal chars
            while time.perf_counter() < end:
                req = pb.GenerateRequest(model=model, prompt="the ", max_chars=4000, temperature=1.0, seed=i)
                call = stub.Generate(req)
                last = time.perf_counter()
                async for r in call:
                    now = time.perf_counter()
                    n = len(r.text)
                    if n:
                        gaps.extend([(now - last) / n] * n)
                        chars += n
                    last = now
                    if now >= end:
                        call.cancel()
                        break

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        elapsed = time.perf_counter() - t0
    g = np.array(gaps) if gaps else np.zeros(1)
    return {"chars_per_s": chars / elapsed, "p50_ms": float(np.percentile(g, 50) * 1e3),
            "p99_ms": float(np.percentile(g, 99) * 1e3), "chars": chars}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=None, help="exported models folder (default: a random model)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--hidden", type=int, default=600)
    ap.add_argument("--streams", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--interval-ms", type=float, nargs="+", default=[50.0],
                    help="the server's --stream-interval-ms (its default: 50); several to compare in one run")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.streams, args.seconds = 16, [4, 1], 2.0
    tmp = None
    folder, name = args.models, args.model
    if folder is None:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name)
        name = export_random(folder, args.hidden, "\n".join(readme_lines()))
    elif name is None:
        name = sorted(p.name for p in folder.iterdir() if (p / "meta.json").exists())[0]
    print(f"model {name} from {folder}; onnxruntime threads: {args.threads or 'default'}")
    results = []
    raw_seconds = 1.0 if args.smoke else min(4.0, args.seconds)
    for n in args.streams:
        # the raw rate right before the server runs at this batch size and right after, averaged:
        # the machine's speed drifts (other tenants), and the ratio should compare like with like
        before = raw_rate(folder, name, n, raw_seconds, args.threads)
        runs = []
        for interval in args.interval_ms:
            with Server(folder, "--max-batch", str(max(n, 1)), "--threads", str(args.threads),
                        "--max-sessions", "4096", "--stream-interval-ms", str(interval)) as server:
                cpu0, client0, step0 = server.cpu_seconds(), _own_cpu(), _step_seconds(server, name)
                t0 = time.perf_counter()
                res = asyncio.run(load(server.port, name, n, args.seconds))
                wall = time.perf_counter() - t0
                # where the machine's time went: the server's CPU (its step graph calls among
                # it) and this client's, per second of the run
                res["server_cpu"] = (server.cpu_seconds() - cpu0) / wall
                res["client_cpu"] = (_own_cpu() - client0) / wall
                res["step_graph_share"] = (_step_seconds(server, name) - step0) / wall
                server.stop()
            runs.append((interval, res))
        after = raw_rate(folder, name, n, raw_seconds, args.threads)
        raw = {"step_s": (before["step_s"] + after["step_s"]) / 2, "before_step_s": before["step_s"],
               "after_step_s": after["step_s"], "torch": before["torch"] or after["torch"]}
        raw["char_steps_per_s"] = n / raw["step_s"]
        for interval, res in runs:
            ratio = res["chars_per_s"] / raw["char_steps_per_s"]
            goal = GOALS.get(n)
            verdict = "" if goal is None else f"  goal {goal:.1f}: {'met' if ratio >= goal else 'NOT met'}"
            print(f"streams {n:>3} interval {interval:g} ms: server {res['chars_per_s']:>9,.0f} chars/s  raw onnxruntime "
                  f"batch-{n} {raw['char_steps_per_s']:>9,.0f} char-steps/s ({raw['before_step_s'] * 1e3:.2f} ms/step before, "
                  f"{raw['after_step_s'] * 1e3:.2f} after)  "
                  f"ratio {ratio:.2f}  between chars p50 {res['p50_ms']:.2f} ms p99 {res['p99_ms']:.2f} ms{verdict}\n"
                  f"    per second of the run: server CPU {res['server_cpu']:.2f} s (in step graph calls "
                  f"{res['step_graph_share']:.2f} s of wall time), client CPU {res['client_cpu']:.2f} s, "
                  f"on {os.cpu_count()} CPUs", flush=True)
            results.append({"streams": n, "interval_ms": interval, "server": res, "raw": raw, "ratio": ratio, "goal": goal})
    print(json.dumps({"model": name, "threads": args.threads, "results": results}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
