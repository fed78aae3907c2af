"""Fault scenarios against a real `nlstm serve` process; each prints PASS or FAIL with its
figures, and the script exits 1 if any failed.

  a. cancel      clients cancel Generate and glimpse streams mid-stream: each session must be
                 usable again at once, and the server must count every call it ran.
  b. disconnect  a client process killed (SIGKILL) mid-call, and a channel closed abruptly
                 mid-call: the server must free the sessions those calls held (not leave them
                 ABORTED) and keep serving another client meanwhile.
  c. stalled     a client process that stops itself (SIGSTOP) right after opening Generate
                 streams never reads them: the server must keep serving another client, and
                 its memory must stop growing once those calls have made their max_chars.
  d. sigterm     SIGTERM under load: health turns NOT_SERVING; calls started before it finish
                 within --grace (glimpse streams paced to end in time end OK, a Generate still
                 running ends with FINISH_REASON_CANCELLED, a glimpse stream its client keeps
                 open gets UNAVAILABLE at the deadline); calls made after NOT_SERVING get
                 UNAVAILABLE; the process exits 0 within the grace period + 1.5 s. Expected
                 too: UNAVAILABLE for calls sent before SIGTERM that the server had not started
                 yet, and CANCELLED, at once, for those grpc still held undispatched when the
                 server's stop began (grpc/grpc#41785).
  e. bound       with --max-sessions S: CreateSession beyond S gets RESOURCE_EXHAUSTED while the
                 S sessions and session-less calls keep being served; closing one makes room.

Each scenario starts its own server (a fresh process, so its memory figures start clean) on a
random character model and the bundled glimpse classifier, or on the models of --models.

    python bench/faults.py                 # every scenario
    python bench/faults.py --only c d      # some of them
    python bench/faults.py --smoke         # fewer calls, shorter waits (CI)
"""

# The docstring above is also --help's text (run_scenarios). This script gives each scenario its
# server and flags; the scenarios live in bench/_faults_clients.py (a-c: clients that misbehave)
# and bench/_faults_server.py (d, e: the server's drain and its session bound).

from __future__ import annotations

import time
from pathlib import Path

import grpc
from _faults_clients import cancel_mid_stream, disconnect, stalled_reader
from _faults_server import session_bound, sigterm_under_load
from _scenarios import Result, run_scenarios

from serving.testing.process import Server


async def run(name: str, folder: Path, smoke: bool, threads: int) -> Result:
    """One scenario against its own server."""
    stall_chars, grace, bound = (3_000, 2.0, 8) if smoke else (50_000, 5.0, 64)
    flags, scenario = {
        "a": (["--max-chars", "100000"], lambda server: cancel_mid_stream(server, smoke)),
        "b": (["--max-chars", "100000"], lambda server: disconnect(server, smoke)),
        "c": (
            ["--max-chars", str(stall_chars)],
            lambda server: stalled_reader(server, smoke, stall_chars),
        ),
        "d": (
            ["--max-chars", "1000000", "--grace", str(grace)],
            lambda server: sigterm_under_load(server, smoke, grace),
        ),
        "e": (["--max-sessions", str(bound)], lambda server: session_bound(server, smoke, bound)),
    }[name]
    t0 = time.perf_counter()
    with Server(folder, "--threads", str(threads), *flags) as server:
        try:
            res = await scenario(server)
        except (
            AssertionError,
            grpc.aio.AioRpcError,
            RuntimeError,
        ) as exc:  # a wrong answer or status
            res = Result(name, "crashed")
            res.check(False, f"{type(exc).__name__}: {exc}")
        if server.proc.poll() is None:
            code, _ = server.stop()
            res.check(code == 0, f"the server exited with {code} on SIGTERM")
        res.check(not server.errors(), f"errors in the server log: {server.errors()[:3]}")
    res.figures["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main() -> None:
    run_scenarios("faults", "abcde", run, "fewer calls and shorter waits (CI)")


if __name__ == "__main__":
    main()
