"""Soak: many concurrent sessions mixing Generate, Score and glimpse streams for minutes
against one `nlstm serve` process, watching its errors, latency and resident memory.

Each of --sessions workers (one asyncio process, one channel) owns a session and loops without
pause: a quarter of them on the glimpse classifier (a stream of the 20 glimpses of a random
MNIST-like image), the others on the character model (Generate of 20-60 characters at a random
temperature in [0, 1.5], a quarter with a short prompt; or Score of a README line); every 25th
call or so a worker closes its session and creates a new one. Every answer is checked (a
Generate ends with LENGTH or STOP_SEQUENCE, a Score counts every character, a glimpse stream
answers each glimpse with probabilities summing to 1).

Reported: per rpc the calls, errors, p50/p99 latency (per call for CreateSession,
CloseSession and Score; from the request to the stream's last message for Generate and
ClassifyGlimpses) and calls/s; the server's resident memory sampled every --sample-every
seconds, at the end of the warm-up and at the end, and its growth in between; the server's own
request counts by status code. No error is expected: every non-OK status and every wrong answer
counts. Exit status 1 on any error, RSS growth above --max-rss-growth MiB, ERROR lines in the
server's log or an unclean exit on SIGTERM.

    python bench/soak.py --tiny                      # 256 sessions for 10 minutes
    python bench/soak.py --models exported/          # the bundled models (the default)
    python bench/soak.py --smoke                     # 8 sessions, a few seconds (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import numpy as np
from _server import REPO, glimpse_requests, models_folder, pick_models, readme_lines

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.testing.process import Server

RPCS = ("Generate", "Score", "ClassifyGlimpses", "CreateSession", "CloseSession")
RECREATE = 1 / 25  # chance, before each call, that a worker replaces its session


class Stats:
    """Latencies and errors per rpc, as the client sees them."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter = Counter()  # "rpc CODE" (or "rpc wrong answer: ...")
        self.chars = Counter()  # generated, scored, glimpses

    async def timed(self, rpc: str, call) -> object | None:
        """Await call(); record its latency, or its error. Returns its result (None on error)."""
        t0 = time.perf_counter()
        try:
            result = await call()
        except grpc.aio.AioRpcError as exc:
            self.errors[f"{rpc} {exc.code().name}"] += 1
            return None
        except AssertionError as exc:
            self.errors[f"{rpc} wrong answer: {exc}"] += 1
            return None
        self.seconds[rpc].append(time.perf_counter() - t0)
        return result


async def worker(
    i: int,
    stub,
    char: str,
    glimpse: str,
    texts: list[str],
    stats: Stats,
    end: float,
    timeout: float,
) -> None:
    rng = np.random.default_rng(i)
    model = glimpse if i % 4 == 3 else char
    sid = None

    async def create():
        return (
            await stub.CreateSession(pb.CreateSessionRequest(model=model), timeout=timeout)
        ).session_id

    async def close():
        await stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=timeout)

    async def generate():
        max_chars = int(rng.integers(20, 61))
        prompt = texts[rng.integers(len(texts))][:12] if rng.random() < 0.25 else ""
        request = pb.GenerateRequest(
            session_id=sid,
            prompt=prompt,
            max_chars=max_chars,
            temperature=float(rng.uniform(0, 1.5)),
        )
        out = [r async for r in stub.Generate(request, timeout=timeout)]
        assert out and out[-1].finish_reason in (
            pb.FINISH_REASON_LENGTH,
            pb.FINISH_REASON_STOP_SEQUENCE,
        ), "a Generate stream ended without LENGTH or STOP_SEQUENCE"
        n = sum(len(r.text) for r in out)
        assert n <= max_chars, f"{n} characters for max_chars {max_chars}"
        stats.chars["generated"] += n

    async def score():
        text = texts[rng.integers(len(texts))]
        r = await stub.Score(pb.ScoreRequest(session_id=sid, text=text), timeout=timeout)
        assert r.num_chars == len(text) and math.isfinite(r.total_bits), (
            "a Score miscounted or is not finite"
        )
        stats.chars["scored"] += r.num_chars

    async def classify():
        out = [
            r
            async for r in stub.ClassifyGlimpses(
                glimpse_requests(rng, session_id=sid), timeout=timeout
            )
        ]
        assert [r.step for r in out] == list(range(1, 21)), (
            "a glimpse stream did not answer every glimpse"
        )
        assert all(abs(sum(r.probabilities) - 1) < 1e-3 for r in out), (
            "probabilities do not sum to 1"
        )
        stats.chars["glimpses"] += len(out)

    while time.perf_counter() < end:
        if sid is not None and rng.random() < RECREATE:
            await stats.timed("CloseSession", close)
            sid = None
        if sid is None:
            sid = await stats.timed("CreateSession", create)
            if sid is None:
                await asyncio.sleep(1.0)  # counted as an error; try again
                continue
        if model == glimpse:
            await stats.timed("ClassifyGlimpses", classify)
        elif rng.random() < 0.5:
            await stats.timed("Generate", generate)
        else:
            await stats.timed("Score", score)
    if sid is not None:
        await stats.timed("CloseSession", close)


async def sample_rss(
    server: Server, every: float, samples: list[tuple[float, float]], t0: float
) -> None:
    while True:
        samples.append((time.perf_counter() - t0, server.rss_mib()))
        await asyncio.sleep(every)


async def soak(server: Server, args: argparse.Namespace) -> dict:
    stats, samples = Stats(), []
    # the ASCII README lines of 10 to 80 characters: a char model scores each character as one
    texts = [line for line in readme_lines() if line.isascii() and 10 <= len(line) <= 80]
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        char, glimpse = await pick_models(stub)
        print(
            f"soak: {args.sessions} sessions for {args.seconds:g} s against {char} and {glimpse} "
            f"(server pid {server.pid}, onnxruntime threads {args.threads}); {os.cpu_count()} "
            f"CPUs, load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        t0, cpu0, client_cpu0 = time.perf_counter(), server.cpu_seconds(), time.process_time()
        sampler = asyncio.create_task(sample_rss(server, args.sample_every, samples, t0))
        await asyncio.gather(
            *(
                worker(i, stub, char, glimpse, texts, stats, t0 + args.seconds, args.timeout)
                for i in range(args.sessions)
            )
        )
        elapsed = time.perf_counter() - t0
        cpu = {
            "server_s": round(server.cpu_seconds() - cpu0, 1),
            "client_s": round(time.process_time() - client_cpu0, 1),
            "load_average_at_end": round(os.getloadavg()[0], 2),
        }
        sampler.cancel()
        samples.append((elapsed, server.rss_mib()))
    server_codes = {
        f"{lab['method']} {lab['code']}": int(v)
        for lab, v in server.samples("nlstm_requests_total")
    }
    batches = {
        m: round(
            server.metric("nlstm_batch_size_sum", model=m)
            / max(1.0, server.metric("nlstm_batch_size_count", model=m)),
            1,
        )
        for m in (char, glimpse)
    }
    active = server.metric("nlstm_active_sessions")
    code, stop_s = server.stop()
    warm = next((s for s in samples if s[0] >= args.warmup), samples[-1])
    after = [s for s in samples if s[0] >= warm[0]]
    slope = (
        np.polyfit([s[0] for s in after], [s[1] for s in after], 1)[0] * 60
        if len(after) > 2
        else 0.0
    )
    rpcs = {}
    for rpc in RPCS:
        ms = np.array(stats.seconds[rpc] or [math.nan]) * 1e3
        errors = sum(n for k, n in stats.errors.items() if k.startswith(f"{rpc} "))
        rpcs[rpc] = {
            "calls": len(stats.seconds[rpc]) + errors,
            "errors": errors,
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 99)},
            "max_ms": round(float(ms.max()), 2),
            "per_s": round(len(stats.seconds[rpc]) / elapsed, 1),
        }
    return {
        "sessions": args.sessions,
        "seconds": round(elapsed, 1),
        "models": [char, glimpse],
        "rpcs": rpcs,
        "cpu": cpu,
        "errors": dict(stats.errors),
        "throughput_per_s": {k: round(v / elapsed, 1) for k, v in stats.chars.items()},
        "rss_mib": {
            "first": round(samples[0][1], 1),
            "warm": round(warm[1], 1),
            "warm_at_s": round(warm[0], 1),
            "end": round(samples[-1][1], 1),
            "max_after_warm": round(max(s[1] for s in after), 1),
            "growth": round(samples[-1][1] - warm[1], 1),
            "slope_mib_per_min": round(float(slope), 3),
        },
        "rss_samples": [(round(t, 1), round(r, 1)) for t, r in samples],
        "server": {
            "non_ok": {k: v for k, v in server_codes.items() if v and not k.endswith(" OK")},
            "ok": sum(v for k, v in server_codes.items() if k.endswith(" OK")),
            "mean_batch": batches,
            "active_sessions_at_end": active,
            "exit_code": code,
            "stop_s": round(stop_s, 2),
            "log_errors": server.errors()[:5],
        },
    }


def report(r: dict, max_growth: float) -> list[str]:
    """Print the summary; return the reasons to fail."""
    print(
        f"{'rpc':<17}{'calls':>9}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'per s':>8}"
    )
    for rpc, s in r["rpcs"].items():
        print(
            f"{rpc:<17}{s['calls']:>9}{s['errors']:>8}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}"
            f"{s['max_ms']:>9.1f}{s['per_s']:>8.1f}"
        )
    t = r["throughput_per_s"]
    print(
        f"throughput: {t.get('generated', 0):,.0f} chars generated/s, {t.get('scored', 0):,.0f} "
        f"chars scored/s, {t.get('glimpses', 0):,.0f} glimpses/s; server mean batch "
        f"{r['server']['mean_batch']}"
    )
    c = r["cpu"]
    print(
        f"CPU time: server {c['server_s']} s, this client {c['client_s']} s in {r['seconds']} s on "
        f"{os.cpu_count()} CPUs (load average {c['load_average_at_end']} at the end)"
    )
    m = r["rss_mib"]
    print(
        f"server RSS: {m['first']} MiB at start, {m['warm']} MiB after warm-up ({m['warm_at_s']} "
        f"s), {m['end']} MiB at the end ({r['seconds']} s): growth {m['growth']:+} MiB (limit "
        f"{max_growth:g}), max {m['max_after_warm']}, trend {m['slope_mib_per_min']:+} MiB/min"
    )
    s = r["server"]
    print(
        f"errors: {r['errors'] or 'none'}; server: {s['ok']} OK, non-OK {s['non_ok'] or 'none'}, "
        f"{s['active_sessions_at_end']:g} sessions left, SIGTERM exit {s['exit_code']} in "
        f"{s['stop_s']} s, log errors {len(s['log_errors'])}"
    )
    failures = []
    if r["errors"] or s["non_ok"]:
        failures.append("unexpected errors")
    if m["growth"] > max_growth:
        failures.append(f"RSS grew {m['growth']} MiB after the warm-up")
    if s["log_errors"] or s["exit_code"] != 0:
        failures.append("server log errors or unclean exit")
    print("soak: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    return failures


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = ap.add_mutually_exclusive_group()
    which.add_argument(
        "--models",
        type=Path,
        default=None,
        help="exported models folder with a character model and a glimpse classifier "
        "(default: the repository's exported/)",
    )
    which.add_argument(
        "--tiny",
        action="store_true",
        help="a random character model (16 cells) and the bundled mnist-nlstm, "
        "in a temporary folder",
    )
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--sessions", type=int, default=256)
    ap.add_argument(
        "--warmup", type=float, default=60.0, help="seconds before the RSS baseline is taken"
    )
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument(
        "--max-rss-growth",
        type=float,
        default=16.0,
        help="MiB of RSS growth after the warm-up that fail",
    )
    ap.add_argument("--timeout", type=float, default=60.0, help="deadline of each call in seconds")
    ap.add_argument(
        "--threads", type=int, default=1, help="the server's onnxruntime intra-op threads"
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="8 sessions for 5 s on the tiny models unless --models (CI)",
    )
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.sessions, args.warmup, args.sample_every, args.max_rss_growth = (
            5.0,
            8,
            2.0,
            0.5,
            64.0,
        )
        args.tiny = args.models is None
    models = None if args.tiny else (args.models or REPO / "exported")
    with (
        models_folder(models) as folder,
        Server(
            folder,
            "--threads",
            str(args.threads),
            "--max-sessions",
            str(max(1024, 2 * args.sessions)),
        ) as server,
    ):
        result = asyncio.run(soak(server, args))
    failures = report(result, args.max_rss_growth)
    print(json.dumps({"soak": result, "passed": not failures}))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
