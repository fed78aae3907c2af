"""Issue 15's attacks, replayed against a real `nlstm serve` process; each prints PASS or FAIL
with its figures, and the script exits 1 if any failed.

  f. stop        40 concurrent Generate calls, each with 4 stop strings of 3.9 MB (legal under a
                 16 MiB receive limit): refused before they are unpacked; memory stays flat.
                 Then 40 with stop strings one character over --max-stop-chars: INVALID_ARGUMENT.
  g. gzip        32 concurrent gzip Score requests of about 15 KB on the wire that unpack to
                 16 MB each: refused by the receive limit (sized from --max-text); then 32 of
                 the longest text allowed, compressed: served, memory bounded.
  h. metrics     100 idle connections to the metrics endpoint: no thread each, at most 64 held,
                 each closed after 10 s; the endpoint listens where --host says.
  i. one client  with API keys and --max-sessions-per-client: one key asks for every session of
                 the bound at once; it gets its share, another key still gets sessions, and a
                 key cannot use or close another key's session (NOT_FOUND).
  j. killed      a client process holding 50 glimpse streams is killed (SIGKILL), 50 more are
                 cancelled: the server counts all 100 as CANCELLED and nlstm_active_sequences
                 falls back to 0.
  k. settings    `nlstm serve` with the issue's out-of-range settings (--idle-timeout 5e9, inf,
                 nan, 0.5; --max-wait-ms inf) exits 2 at once with one line naming the flag.

    python bench/abuse.py                  # every scenario
    python bench/abuse.py --only f g       # some of them
    python bench/abuse.py --smoke          # fewer calls (CI)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from _scenarios import Result, run_scenarios, spawn, status
from _server import REPO, pick_models

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.testing.process import Server

GLIMPSE = [0.5] * 49

# j: a client holding N glimpse streams open (one glimpse answered each) until it is killed
HOLDING_CLIENT = r"""
import asyncio, sys
import grpc
from serving.api.nlstm.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc
target, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
async def main():
    stub = pb_grpc.InferenceStub(grpc.aio.insecure_channel(target))
    streams = [stub.ClassifyGlimpses() for _ in range(n)]
    for st in streams:
        await st.write(pb.GlimpseRequest(model=model, pixels=[0.5] * 49))
        await st.read()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


class PeakRss:
    """The server's resident memory sampled every 10 ms in a thread: the peak while running."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak, self._stop = server, server.rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_mib())
            time.sleep(0.01)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak, 1)


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


async def stop_strings(server: Server, smoke: bool) -> Result:
    res = Result("f", "stop: huge stop strings")
    n = 4 if smoke else 40
    async with grpc.aio.insecure_channel(
        server.target, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:
        stub = pb_grpc.InferenceStub(ch)
        char, _ = await pick_models(stub)
        rss0 = server.rss_mib()
        peak = PeakRss(server)
        huge = ["x" * 3_900_000] * 4
        codes = Counter(
            await asyncio.gather(
                *(
                    status(
                        stub.Generate(
                            pb.GenerateRequest(model=char, max_chars=10, stop=huge)
                        ).read()
                    )
                    for _ in range(n)
                )
            )
        )
        over = ["x" * 257] * 4
        codes_over = Counter(
            await asyncio.gather(
                *(
                    status(
                        stub.Generate(
                            pb.GenerateRequest(model=char, max_chars=10, stop=over)
                        ).read()
                    )
                    for _ in range(n)
                )
            )
        )
        ok = await status(
            stub.Generate(pb.GenerateRequest(model=char, max_chars=10, stop=["x" * 256] * 4)).read()
        )
        res.figures.update(
            huge_stops=dict(codes),
            stops_of_257=dict(codes_over),
            stops_of_256=ok,
            rss_before_mib=round(rss0, 1),
            rss_peak_mib=peak.stop(),
            rss_after_mib=round(server.rss_mib(), 1),
        )
    res.check(codes == Counter({"RESOURCE_EXHAUSTED": n}), f"huge stop strings: {dict(codes)}")
    res.check(
        codes_over == Counter({"INVALID_ARGUMENT": n}),
        f"stop strings over the limit: {dict(codes_over)}",
    )
    res.check(ok == "OK", f"stop strings at the limit: {ok}")
    res.check(
        res.figures["rss_peak_mib"] - rss0 < 64,
        f"peak RSS grew {res.figures['rss_peak_mib'] - rss0:.0f} MiB",
    )
    return res


async def gzip_bombs(server: Server, smoke: bool) -> Result:
    res = Result("g", "gzip: compressed requests that unpack past the limits")
    n = 4 if smoke else 32
    async with grpc.aio.insecure_channel(server.target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        char, _ = await pick_models(stub)
        rss0 = server.rss_mib()
        peak = PeakRss(server)
        bomb = pb.ScoreRequest(model=char, text="a" * 16_000_000)
        codes = Counter(
            await asyncio.gather(
                *(status(stub.Score(bomb, compression=grpc.Compression.Gzip)) for _ in range(n))
            )
        )
        bomb_peak = peak.stop()
        peak = PeakRss(server)
        longest = pb.ScoreRequest(
            model=char, text="the cat sat on the mat " * 4347
        )  # 99,981 characters
        n_max = 1 if smoke else n  # each is 100,000 characters of scoring
        codes_max = Counter(
            await asyncio.gather(
                *(
                    status(stub.Score(longest, compression=grpc.Compression.Gzip))
                    for _ in range(n_max)
                )
            )
        )
        res.figures.update(
            bombs=dict(codes),
            wire_bytes_each=len(_gzip(bomb.SerializeToString())),
            longest_allowed=dict(codes_max),
            rss_before_mib=round(rss0, 1),
            rss_peak_bombs_mib=bomb_peak,
            rss_peak_longest_mib=peak.stop(),
            rss_after_mib=round(server.rss_mib(), 1),
        )
    res.check(codes == Counter({"RESOURCE_EXHAUSTED": n}), f"gzip bombs: {dict(codes)}")
    res.check(codes_max == Counter({"OK": n_max}), f"the longest text allowed: {dict(codes_max)}")
    res.check(bomb_peak - rss0 < 64, f"peak RSS under the bombs grew {bomb_peak - rss0:.0f} MiB")
    return res


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


async def metrics_idle(server: Server, smoke: bool) -> Result:
    res = Result("h", "metrics: idle connections to the metrics endpoint")
    hosts = sorted(
        {
            line.split("http://", 1)[1].rsplit(":", 1)[0]
            for line in server.log
            if "metrics on http://" in line
        }
    )
    before = threads_of(server.pid)
    conns = []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", server.metrics_port))
        conns.append(s)
    await asyncio.sleep(0.5)
    during = threads_of(server.pid)
    t0 = time.perf_counter()
    closed_at: list[float] = []
    for s in conns:
        s.settimeout(0.0 if smoke else 15.0)
    if not smoke:
        for s in conns:
            with contextlib.suppress(TimeoutError, ConnectionError, OSError):
                s.recv(1)
            closed_at.append(time.perf_counter() - t0)
    for s in conns:
        s.close()
    scrape = server.metric("nlstm_max_sessions")
    res.figures.update(
        metrics_hosts=hosts,
        server_threads_before=before,
        with_100_idle=during,
        all_closed_after_s=round(max(closed_at), 1) if closed_at else None,
        scrape_ok=scrape > 0,
    )
    res.check("0.0.0.0" not in hosts and hosts, f"the metrics endpoint listens on {hosts}")
    res.check(
        during <= before + 2, f"server threads {before} -> {during} with 100 idle connections"
    )
    res.check(
        smoke or max(closed_at) < 12.5,
        f"idle connections closed after {max(closed_at or [0]):.1f} s",
    )
    res.check(scrape > 0, "the endpoint still answers")
    return res


async def one_client(
    server: Server, smoke: bool, keys: list[str], bound: int, per_client: int
) -> Result:
    res = Result(
        "i", f"one client: --max-sessions {bound} --max-sessions-per-client {per_client}, API keys"
    )
    md_a, md_b = [("authorization", f"Bearer {keys[0]}")], [("authorization", f"Bearer {keys[1]}")]
    async with grpc.aio.insecure_channel(server.target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        listed = (await stub.ListModels(pb.ListModelsRequest(), metadata=md_a)).models
        char = next(m.name for m in listed if m.vocab_size)

        async def create(md):
            try:
                return "OK", (
                    await stub.CreateSession(pb.CreateSessionRequest(model=char), metadata=md)
                ).session_id
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, exc.details()

        t0 = time.perf_counter()
        results = await asyncio.gather(*(create(md_a) for _ in range(bound)))
        seconds = time.perf_counter() - t0
        codes = Counter(c for c, _ in results)
        details = next((d for c, d in results if c != "OK"), "")
        theirs = await create(md_b)
        mine = [d for c, d in results if c == "OK"]
        stolen = await status(
            stub.Score(pb.ScoreRequest(session_id=mine[0], text="abc"), metadata=md_b)
        )
        closed = await status(
            stub.CloseSession(pb.CloseSessionRequest(session_id=mine[0]), metadata=md_b)
        )
        nokey = await status(stub.ListModels(pb.ListModelsRequest()))
        for sid in mine:
            await stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=md_a)
        res.figures.update(
            asked=bound,
            got=dict(codes),
            seconds=round(seconds, 2),
            message=details[:90],
            other_key=theirs[0],
            other_key_uses_it=stolen,
            other_key_closes_it=closed,
            no_key=nokey,
        )
    res.check(
        codes == Counter({"OK": per_client, "RESOURCE_EXHAUSTED": bound - per_client}),
        f"one key got {dict(codes)}",
    )
    res.check("per-client session limit" in details, f"the refusal says: {details!r}")
    res.check(theirs[0] == "OK", f"another key's CreateSession: {theirs[0]}")
    res.check(stolen == closed == "NOT_FOUND", f"another key on the session: {stolen}, {closed}")
    res.check(nokey == "UNAUTHENTICATED", f"no key: {nokey}")
    return res


async def killed_glimpses(server: Server, smoke: bool) -> Result:
    res = Result("j", "killed: glimpse streams of a killed client, and cancelled ones")
    n = 10 if smoke else 50
    async with grpc.aio.insecure_channel(server.target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        _, glimpse = await pick_models(stub)
        proc = await spawn(HOLDING_CLIENT, server.target, glimpse, str(n))
        proc.kill()
        proc.wait()
        streams = [stub.ClassifyGlimpses() for _ in range(n)]
        for st in streams:
            await st.write(pb.GlimpseRequest(model=glimpse, pixels=GLIMPSE))
            await st.read()
        for st in streams:
            st.cancel()
        deadline = time.perf_counter() + 5
        while time.perf_counter() < deadline:
            counted = {
                c: int(server.metric("nlstm_requests_total", method="ClassifyGlimpses", code=c))
                for c in ("OK", "CANCELLED")
            }
            active = server.metric("nlstm_active_sequences", model=glimpse)
            if counted["CANCELLED"] == 2 * n and active == 0:
                break
            await asyncio.sleep(0.1)
        res.figures.update(streams=2 * n, counted=counted, active_sequences_after=active)
    res.check(
        counted == {"OK": 0, "CANCELLED": 2 * n}, f"counted {counted} of {2 * n} cancelled streams"
    )
    res.check(active == 0, f"nlstm_active_sequences is {active} on an idle server")
    return res


def bad_settings(folder: Path) -> Result:
    res = Result("k", "settings: out-of-range values refused at start")
    seen = {}
    for flag, value in (
        ("--idle-timeout", "5e9"),
        ("--idle-timeout", "inf"),
        ("--idle-timeout", "nan"),
        ("--idle-timeout", "0.5"),
        ("--max-wait-ms", "inf"),
    ):
        t0 = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "training.cli",
                "serve",
                "--models",
                str(folder),
                "--port",
                "0",
                "--metrics-port",
                "-1",
                flag,
                value,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        line = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
        seen[f"{flag} {value}"] = (
            f"exit {out.returncode} in {time.perf_counter() - t0:.1f} s: {line}"
        )
        res.check(
            out.returncode == 2 and f"{flag} must be" in line,
            f"{flag} {value}: {seen[f'{flag} {value}']}",
        )
    res.figures.update(seen)
    return res


async def run(name: str, folder: Path, smoke: bool, threads: int) -> Result:
    if name == "k":
        return bad_settings(folder)
    bound, per_client = (16, 4) if smoke else (256, 64)
    keys = [secrets.token_urlsafe(24) for _ in range(2)]
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as f:
        f.write("\n".join(keys) + "\n")
    try:
        flags, scenario = {
            "f": ([], lambda s: stop_strings(s, smoke)),
            "g": ([], lambda s: gzip_bombs(s, smoke)),
            "h": ([], lambda s: metrics_idle(s, smoke)),
            "i": (
                [
                    "--api-keys-file",
                    f.name,
                    "--max-sessions",
                    str(bound),
                    "--max-sessions-per-client",
                    str(per_client),
                ],
                lambda s: one_client(s, smoke, keys, bound, per_client),
            ),
            "j": ([], lambda s: killed_glimpses(s, smoke)),
        }[name]
        t0 = time.perf_counter()
        with Server(folder, "--threads", str(threads), *flags) as server:
            try:
                res = await scenario(server)
            except (AssertionError, grpc.aio.AioRpcError, RuntimeError) as exc:
                res = Result(name, "crashed")
                res.check(False, f"{type(exc).__name__}: {exc}")
            if server.proc.poll() is None:
                code, _ = server.stop()
                res.check(code == 0, f"the server exited with {code} on SIGTERM")
            res.check(not server.errors(), f"errors in the server log: {server.errors()[:3]}")
        res.figures["seconds"] = round(time.perf_counter() - t0, 1)
        return res
    finally:
        os.unlink(f.name)


def main() -> None:
    run_scenarios("abuse", "fghijk", run, "fewer calls (CI)")


if __name__ == "__main__":
    main()
