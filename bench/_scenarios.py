"""What the scenario scripts (bench/faults.py, bench/abuse.py) share: a scenario's `Result`,
the calls and checks they make of a server (`status`, `drain`, `create`, `usable_after`,
`server_counts`, `check_released`, `check_counted`), a client that keeps calling meanwhile
(`Bystander`), client processes to kill or stop (`spawn`), and their command line
(`run_scenarios`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from _server import REPO, glimpse_requests, models_folder

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.testing.process import Server

RELEASE_LIMIT = 5.0  # seconds a freed session may take to be usable again before it counts as held


@dataclass
class Result:
    name: str
    title: str
    figures: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, failure: str) -> None:
        if not ok:
            self.failures.append(failure)

    @property
    def passed(self) -> bool:
        return not self.failures


def pct(values: list[float], q: float) -> float:
    """The q-th percentile of values in ms (nan when empty)."""
    return round(float(np.percentile(values, q)) * 1e3, 2) if values else math.nan


async def status(call: Awaitable) -> str:
    """Await a call (or a coroutine of several); the name of its status code."""
    try:
        await call
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def drain(stream) -> None:
    """Read a response stream to its end."""
    async for _ in stream:
        pass


class Bystander:
    """Another client, served throughout a scenario: Generate (40 characters) and Score
    (a sentence) in turn, each call's (rpc, start, seconds, status code) recorded."""

    def __init__(self, stub, char_model: str) -> None:
        self.stub, self.model = stub, char_model
        self.calls: list[tuple[str, float, float, str]] = []
        self._stopping = False
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        i = 0
        while not self._stopping:
            rpc, t0 = ("Generate", "Score")[i % 2], time.perf_counter()
            if rpc == "Score":
                code = await status(
                    self.stub.Score(
                        pb.ScoreRequest(model=self.model, text="the cat sat"), timeout=30
                    )
                )
            else:
                request = pb.GenerateRequest(model=self.model, max_chars=40, temperature=1.0)
                code = await status(drain(self.stub.Generate(request, timeout=30)))
            self.calls.append((rpc, t0, time.perf_counter() - t0, code))
            i += 1
            await asyncio.sleep(0.01)

    def window(self, since: float, until: float = math.inf) -> dict:
        """Calls started in [since, until): how many, their errors, p50/p99 latency in ms."""
        calls = [c for c in self.calls if since <= c[1] < until]
        ok = [c[2] for c in calls if c[3] == "OK"]
        return {
            "calls": len(calls),
            "errors": dict(Counter(c[3] for c in calls if c[3] != "OK")),
            "p50_ms": pct(ok, 50),
            "p99_ms": pct(ok, 99),
        }

    def count(self, rpc: str) -> int:
        """Calls of `rpc` finished so far."""
        return sum(1 for c in self.calls if c[0] == rpc)

    async def stop(self, calls: Counter) -> None:
        """Let the call in flight finish, stop, and add the calls made to `calls`."""
        self._stopping = True
        await self._task
        calls.update(c[0] for c in self.calls)


async def create(stub, model: str) -> str:
    return (await stub.CreateSession(pb.CreateSessionRequest(model=model))).session_id


async def usable_after(
    stub, session_id: str, glimpse: bool, rng: np.random.Generator, calls: Counter
) -> float:
    """Seconds until the session is free again: a call on it (a Score, or a whole glimpse
    stream) is retried while it gets ABORTED (the session is still held by a call the server
    has not finished), and the start of the first that succeeds counts; inf when that lasts
    RELEASE_LIMIT seconds."""
    t0 = time.perf_counter()
    while (attempt := time.perf_counter()) - t0 < RELEASE_LIMIT:
        try:
            if glimpse:
                calls["ClassifyGlimpses"] += 1
                # one glimpse, then its answer, then the next: each write follows an answer, so a
                # stream the server ends early (ABORTED after the first glimpse) reports that code
                # on the read. A write racing the server's status would get INTERNAL "Internal
                # error from Core" in its place (grpc/grpc#36066).
                stream = stub.ClassifyGlimpses(timeout=30)
                out = []
                for request in glimpse_requests(rng, session_id=session_id):
                    await stream.write(request)
                    out.append(await stream.read())
                await stream.done_writing()
                assert await stream.read() is grpc.aio.EOF and len(out) == 20, (
                    f"{len(out)} answers to 20 glimpses"
                )
            else:
                calls["Score"] += 1
                await stub.Score(pb.ScoreRequest(session_id=session_id, text="the cat"), timeout=30)
            return attempt - t0
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
        await asyncio.sleep(0.005)
    return math.inf


async def server_counts(server: Server, calls: Counter, methods: tuple[str, ...]) -> dict[str, int]:
    """The server's nlstm_requests_total per method, once it matches what the client issued
    (a cancelled call's handler ends a moment after the client has moved on) or after 3 s."""
    deadline = time.perf_counter() + 3
    while True:
        counted = {m: int(server.metric("nlstm_requests_total", method=m)) for m in methods}
        if all(counted[m] == calls[m] for m in methods) or time.perf_counter() > deadline:
            return counted
        await asyncio.sleep(0.1)


def check_released(res: Result, release: list[float], what: str) -> None:
    """Figures and check of usable_after() times of the sessions freed by `what`."""
    held = sum(1 for r in release if math.isinf(r))
    finite = [r for r in release if not math.isinf(r)]
    res.figures[f"session_free_after_{what.replace(' ', '_')}_ms"] = {
        "p50": pct(finite, 50),
        "max": pct(finite, 100),
    }
    res.check(
        held == 0,
        f"{held} of {len(release)} sessions still ABORTED {RELEASE_LIMIT:g} s after {what}",
    )


def check_counted(res: Result, counted: dict[str, int], calls: Counter) -> None:
    res.figures["server_counted"] = {m: f"{counted[m]}/{calls[m]}" for m in counted}
    for m, n in counted.items():
        res.check(n == calls[m], f"the server counted {n} {m} calls of the {calls[m]} made")


async def spawn(script: str, *argv: str) -> subprocess.Popen:
    """A client subprocess; returns once it has printed its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *argv], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    line = await asyncio.wait_for(
        asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline), 60
    )
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the client subprocess did not start (exit code {proc.wait()})")
    return proc


# ---------------------------------------------------------------------------- the scenarios


def run_scenarios(label: str, scenarios: str, run, smoke_help: str) -> None:
    """The command line of a scenario script (this one, bench/abuse.py): parse the flags, run
    each scenario chosen from `scenarios` with `run(name, folder, smoke, threads)`, print each
    result and a JSON line keyed by `label`, exit 1 when any failed."""
    ap = argparse.ArgumentParser(
        description=sys.modules["__main__"].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--models",
        type=Path,
        default=None,
        help="exported models folder with a character model and a glimpse classifier "
        "(default: a random character model and the bundled mnist-nlstm)",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        choices=list(scenarios),
        default=list(scenarios),
        help="scenarios to run",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="the server's onnxruntime intra-op threads"
    )
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    args = ap.parse_args()
    print(
        f"{label}: scenarios {' '.join(args.only)}{' (smoke)' if args.smoke else ''}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with models_folder(args.models) as folder:
        results = []
        for name in args.only:
            res = asyncio.run(run(name, folder, args.smoke, args.threads))
            results.append(res)
            print(f"{'PASS' if res.passed else 'FAIL'}  {res.name}. {res.title}", flush=True)
            for key, value in res.figures.items():
                print(f"        {key}: {value}")
            for failure in res.failures:
                print(f"        FAILED: {failure}")
    failed = [r.name for r in results if not r.passed]
    print(
        f"{label}: {len(results) - len(failed)} of {len(results)} scenarios passed"
        + (f"; failed: {' '.join(failed)}" if failed else "")
    )
    print(
        json.dumps(
            {
                label: [
                    {
                        "name": r.name,
                        "passed": r.passed,
                        "figures": r.figures,
                        "failures": r.failures,
                    }
                    for r in results
                ]
            }
        )
    )
    sys.exit(1 if failed else 0)
