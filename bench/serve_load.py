"""Serving throughput: N concurrent Generate streams against a real `nlstm serve` process.

In one run, for each number of streams N (and each --interval-ms):
  1. the raw onnxruntime step rate of the same model at batch N (char-steps/s = N / step
     time), in a subprocess that never imports torch and runs the step the server's scheduler
     runs;
  2. a server process (`nlstm serve --port 0`) and N concurrent Generate streams:
     aggregate characters/s, and p50/p99 of the time between characters (time between stream
     messages divided by the characters they carry), counted over each window once every
     stream runs (a warm-up of up to 0.5 s first; the streams' ragged end is left out too);
in --rounds alternating windows: raw, server, raw, server, ..., raw, each --seconds/--rounds
long. The machine's speed drifts (other tenants: the raw rate moves by 30% within a minute),
so each server window is compared with the raw windows just before and after it, and the
ratio printed is the median of those per-window ratios (all of them are in the JSON line).

    python bench/serve_load.py --models exported/ --model ptb-nlstm --streams 64 --seconds 20
    python bench/serve_load.py --smoke            # a tiny random model, a few seconds (CI)
    python bench/serve_load.py --streams 64 --stores none memory redis   # streams on sessions

--stores runs each stream without a session (`none`, the default), or on its own session (each
Generate continues it) kept in the server's memory (`memory`), in a redis-server this script
starts (`redis`), in a temporary folder (`file`), or in a store given by URL (redis://...).

Without --models, a random model of the paper's PTB size (NLSTM 2x600, 50 symbols; --hidden
to change) is exported to a temporary folder first. The client shares the machine with the
server: on a 2-core machine it takes part of the CPU the server would otherwise use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _server import RANDOM_MODEL, REPO, readme_lines

from serving.testing.process import Server, redis_server
from training.testing.models import export_random_char

# the goals: the server's chars/s over the raw step rate at the same batch size
GOALS = {64: 0.8, 1: 0.7}

# Reads a window's length in seconds per stdin line and answers each with the window's mean
# step time; the model stays loaded between windows.
RAW_RATE = r"""
import json, sys, time
import numpy as np
from serving.runtime import load_model
folder, name, batch, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
m = load_model(f"{folder}/{name}", providers="cpu", intra_op_threads=threads or None)
state = m.initial_state(batch)
x = np.zeros(batch, np.int64)
for line in sys.stdin:
    seconds = float(line)
    # check=False: the step the server's scheduler runs (it builds its inputs itself)
    for _ in range(20):
        _, state = m.step(x, state, check=False)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, state = m.step(x, state, check=False)
        n += 1
    figures = {"step_s": (time.perf_counter() - t0) / n, "torch": "torch" in sys.modules}
    print(json.dumps(figures), flush=True)
"""


class RawRate:
    """The raw-rate subprocess for one batch size: `measure(seconds)` runs one window and
    returns its mean step time in seconds."""

    def __init__(self, folder: Path, name: str, batch: int, threads: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RAW_RATE, str(folder), name, str(batch), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )

    def measure(self, seconds: float) -> float:
        self.proc.stdin.write(f"{seconds}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the raw-rate process exited with {self.proc.wait()}")
        result = json.loads(line)
        assert not result["torch"], "the raw-rate process must not load torch"
        return result["step_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _step_seconds(server: Server, model: str) -> float:
    return server.metric("nlstm_step_duration_seconds_sum", model=model)


async def load(
    port: int, model: str, streams: int, seconds: float, warmup: float, sessions: bool = False
) -> dict:
    """`streams` concurrent Generate streams (each restarted when it ends; with `sessions`, each
    on its own session, which every call continues) for warmup + seconds;
    counts the characters of the messages that arrive in the last `seconds` only, when every
    stream runs: the streams' start (prompts, staggered joins) and their ragged end (each stops
    at its first message after the window) stay out of the figure."""
    import grpc

    from serving.api.nlstm.v1 import inference_pb2 as pb
    from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc

    gaps: list[float] = []
    chars = 0
    start = time.perf_counter() + warmup
    end = start + seconds
    async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def one(i: int):
            nonlocal chars
            on = {"model": model}
            if sessions:
                on = {
                    "session_id": (
                        await stub.CreateSession(pb.CreateSessionRequest(model=model))
                    ).session_id
                }
            while time.perf_counter() < end:
                req = pb.GenerateRequest(
                    **on, prompt="the ", max_chars=4000, temperature=1.0, seed=i
                )
                call = stub.Generate(req)
                last = time.perf_counter()
                async for r in call:
                    now = time.perf_counter()
                    n = len(r.text)
                    if n and start <= now <= end:
                        gaps.extend([(now - last) / n] * n)
                        chars += n
                    last = now
                    if now >= end:
                        call.cancel()
                        break

        await asyncio.gather(*(one(i) for i in range(streams)))
    return {"chars_per_s": chars / seconds, "chars": chars, "gaps": np.array(gaps)}


def serve_windows(
    server: Server,
    raw: RawRate,
    name: str,
    n: int,
    window: float,
    rounds: int,
    sessions: bool = False,
):
    """`rounds` windows of n streams on `server`, each between two raw-rate windows. Returns
    the server's figures over all its windows, the raw windows' step times, and each server
    window's ratio to the mean of the raw windows around it."""
    raw_steps = [raw.measure(window)]
    ratios, chars, gaps, wall = [], 0, [], 0.0
    server_cpu = client_cpu = step_graph = 0.0
    for _ in range(rounds):
        cpu0, client0, step0 = server.cpu_seconds(), _own_cpu(), _step_seconds(server, name)
        t0 = time.perf_counter()
        res = asyncio.run(
            load(server.port, name, n, window, warmup=min(0.5, window / 4), sessions=sessions)
        )
        wall += time.perf_counter() - t0
        server_cpu += server.cpu_seconds() - cpu0
        client_cpu += _own_cpu() - client0
        step_graph += _step_seconds(server, name) - step0
        time.sleep(0.2)  # the server drops the cancelled streams before the raw window starts
        raw_steps.append(raw.measure(window))
        ratios.append(res["chars_per_s"] / (n / np.mean(raw_steps[-2:])))
        chars += res["chars"]
        gaps.append(res["gaps"])
    g = np.concatenate(gaps) if chars else np.zeros(1)
    return (
        {
            "chars_per_s": chars / (rounds * window),
            "chars": chars,
            "p50_ms": float(np.percentile(g, 50) * 1e3),
            "p99_ms": float(np.percentile(g, 99) * 1e3),
            # where the machine's time went, per second of the server windows (warm-up and end
            # included): the server's CPU (its step graph calls among it) and this client's
            "server_cpu": server_cpu / wall,
            "client_cpu": client_cpu / wall,
            "step_graph_share": step_graph / wall,
        },
        raw_steps,
        ratios,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--models", type=Path, default=None, help="exported models folder (default: a random model)"
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--hidden", type=int, default=600)
    ap.add_argument("--streams", type=int, nargs="+", default=[64, 1])
    ap.add_argument(
        "--seconds", type=float, default=20.0, help="server time per N and interval, in all rounds"
    )
    ap.add_argument(
        "--rounds", type=int, default=5, help="server windows, each between two raw-rate windows"
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)"
    )
    ap.add_argument(
        "--interval-ms",
        type=float,
        nargs="+",
        default=[50.0],
        help="the server's --stream-interval-ms (its default: 50); several to compare in one run",
    )
    ap.add_argument(
        "--max-messages-per-s",
        type=float,
        default=None,
        help="the server's --max-messages-per-s, the message budget of a model's streams "
        "(default: the server's, 400)",
    )
    ap.add_argument(
        "--stores",
        nargs="+",
        default=["none"],
        help="none (streams without sessions), memory, redis (a redis-server started here), file "
        "(a temporary folder) or a store URL: each stream on its own session in that store",
    )
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.streams, args.seconds, args.rounds = 16, [4, 1], 2.0, 2
    if args.rounds < 1 or args.seconds <= 0:
        ap.error("--rounds must be >= 1 and --seconds > 0")
    tmp = None
    folder, name = args.models, args.model
    if folder is None:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name)
        name = export_random_char(folder / RANDOM_MODEL, args.hidden, readme_lines()).name
    elif name is None:
        name = sorted(p.name for p in folder.iterdir() if (p / "meta.json").exists())[0]
    if args.max_messages_per_s is None:
        budget, budget_flags = "the server's default", []
    else:
        budget, budget_flags = (
            f"{args.max_messages_per_s:g}/s",
            ["--max-messages-per-s", str(args.max_messages_per_s)],
        )
    print(
        f"model {name} from {folder}; onnxruntime threads: {args.threads or 'default'}; message "
        f"budget: {budget}; {args.rounds} rounds of {args.seconds / args.rounds:g} s",
        flush=True,
    )
    window = args.seconds / args.rounds
    results = []
    with contextlib.ExitStack() as stack:
        urls = {}
        for store in args.stores:
            if store == "redis":
                urls[store] = stack.enter_context(redis_server())
            elif store == "file":
                urls[store] = "file:" + stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="nlstm-sessions-")
                )
            else:
                urls[store] = store
        for n, interval, store in itertools.product(args.streams, args.interval_ms, args.stores):
            results.append(
                run_one(folder, name, n, interval, store, urls[store], window, args, budget_flags)
            )
    print(
        json.dumps(
            {
                "model": name,
                "threads": args.threads,
                "max_messages_per_s": args.max_messages_per_s,
                "results": results,
            }
        )
    )
    if tmp is not None:
        tmp.cleanup()


def run_one(
    folder: Path,
    name: str,
    n: int,
    interval: float,
    store: str,
    url: str,
    window: float,
    args,
    budget_flags: list[str],
) -> dict:
    """One server (sessions in `url`; store `none`: no sessions) and n streams at one interval."""
    sessions = store != "none"
    store_flags = ["--session-store", url] if sessions else []
    raw = RawRate(folder, name, n, args.threads)
    try:
        with Server(
            folder,
            "--max-batch",
            str(max(n, 1)),
            "--threads",
            str(args.threads),
            "--max-sessions",
            "4096",
            "--stream-interval-ms",
            str(interval),
            *budget_flags,
            *store_flags,
        ) as server:
            res, raw_steps, ratios = serve_windows(
                server, raw, name, n, window, args.rounds, sessions
            )
            server.stop()
            if server.errors():
                raise RuntimeError("the server logged errors:\n" + "\n".join(server.errors()[-20:]))
    finally:
        raw.close()
    raw_step = float(np.mean(raw_steps))
    ratio = float(np.median(ratios))
    goal = GOALS.get(n)
    verdict = "" if goal is None else f"  goal {goal:.1f}: {'met' if ratio >= goal else 'NOT met'}"
    print(
        f"streams {n:>3} interval {interval:g} ms sessions {store}: server "
        f"{res['chars_per_s']:>9,.0f} chars/s  "
        f"raw onnxruntime batch-{n} {n / raw_step:>9,.0f} char-steps/s ({min(raw_steps) * 1e3:.2f}-"
        f"{max(raw_steps) * 1e3:.2f} ms/step)  ratio {ratio:.2f} (windows "
        f"{min(ratios):.2f}-{max(ratios):.2f})  "
        f"between chars p50 {res['p50_ms']:.2f} ms p99 {res['p99_ms']:.2f} ms{verdict}\n"
        f"    per second of the run: server CPU {res['server_cpu']:.2f} s (in step graph calls "
        f"{res['step_graph_share']:.2f} s of wall time), client CPU {res['client_cpu']:.2f} s, "
        f"on {os.cpu_count()} CPUs",
        flush=True,
    )
    return {
        "streams": n,
        "interval_ms": interval,
        "store": store,
        "server": res,
        "ratio": ratio,
        "ratios": ratios,
        "goal": goal,
        "raw": {"step_s": raw_step, "char_steps_per_s": n / raw_step, "window_step_s": raw_steps},
    }


if __name__ == "__main__":
    main()
