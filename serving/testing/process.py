"""Servers in their own processes, for tests and benchmarks: `nlstm serve` (`Server`), a
throwaway `redis-server` (`RedisServer`, `redis_server`), and what a benchmark reads of a
process (`rss_mib`, `cpu_seconds`).

`Server` starts `nlstm serve --port 0` (and `--metrics-port 0` when asked), reads the ports it
picked from its log, and keeps reading the log in a thread so that the pipe never fills and
blocks the server; the lines stay in `Server.log` for the reports. Every process started here
gets SIGTERM when the process that started it dies (`die_with_parent`). No torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` in MiB."""
    try:
        import psutil
    except ImportError:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # kB
        raise OSError(f"no VmRSS in /proc/{pid}/status") from None
    return psutil.Process(pid).memory_info().rss / 2**20


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process `pid` has used, in seconds."""
    try:
        import psutil
    except ImportError:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


# Runs in the server's process before it becomes the server (Linux): SIGTERM it when the
# process that started it dies, even by a signal that skips the context manager's cleanup; then
# exec the real command (same pid). Not a preexec_fn: forking a process whose gRPC threads run
# (a test or benchmark with channels open) and running Python in the child before exec can
# kill the child in gRPC's fork handlers ("epoll_wait error: Bad file descriptor").
_DIE_WITH_PARENT = (
    "import os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    import ctypes  # prctl(PR_SET_PDEATHSIG = 1, SIGTERM)\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def die_with_parent(argv: list[str]) -> list[str]:
    """`argv` run so that it gets SIGTERM when the process that starts it dies."""
    return [sys.executable, "-c", _DIE_WITH_PARENT, *argv]


class Server:
    """`nlstm serve` in a subprocess on free ports (`port`, and `metrics_port` with metrics=True).

    `flags` go on its command line after --models, --port, --host and --metrics-port, e.g.
    ("--max-sessions", "16"). Use as a context manager: leaving it kills a server still running.
    """

    def __init__(
        self, models: Path, *flags: str, metrics: bool = True, start_timeout: float = 120.0
    ) -> None:
        self.proc = subprocess.Popen(
            die_with_parent(
                [
                    sys.executable,
                    "-m",
                    "serving.cli",
                    "serve",
                    "--models",
                    str(models),
                    "--port",
                    "0",
                    "--host",
                    "localhost",
                    "--metrics-port",
                    "0" if metrics else "-1",
                    *flags,
                ]
            ),
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.log: list[str] = []
        self.port = 0
        self.metrics_port = 0
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._ready.wait(start_timeout) or not self.port:
            self.proc.kill()
            self.proc.wait()
            self._reader.join(5)
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-20:]))

    def _read_log(self) -> None:
        assert self.proc.stderr is not None  # stderr=PIPE
        for line in self.proc.stderr:
            self.log.append(line)
            if m := re.search(r"metrics on http://\S+:(\d+)/metrics", line):
                self.metrics_port = int(m.group(1))
            if m := re.search(r"on port (\d+)", line):
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()  # the server exited (before it started, if port is still 0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def rss_mib(self) -> float:
        return rss_mib(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of every /metrics sample called `name`."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(
            f"http://localhost:{self.metrics_port}/metrics", timeout=10
        ) as r:
            text = r.read().decode()
        return [
            (s.labels, s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        ]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return sum(
            v for have, v in self.samples(name) if all(have.get(k) == x for k, x in labels.items())
        )

    def errors(self) -> list[str]:
        """Log lines that report an error or a traceback."""
        return [
            line.rstrip() for line in self.log if " ERROR " in line or line.startswith("Traceback")
        ]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, float]:
        """Send `sig` and wait for the exit: (exit code, seconds it took)."""
        t0 = time.perf_counter()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code, time.perf_counter() - t0

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RedisMissing(RuntimeError):
    """No redis-server binary on this machine."""


class RedisServer:
    """A real `redis-server` on a free loopback port, without persistence (no RDB or AOF files:
    a restart starts empty, as a Redis that lost its memory would). It can be stopped and
    started again on the same port (the tests of a Redis outage). Raises RedisMissing when the
    binary is not installed."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisMissing(
                "redis-server is not installed (Debian: apt-get install redis-server; .ci/run does)"
            )
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            die_with_parent(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "warning",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None  # stderr=PIPE
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited: {self.proc.stderr.read().decode(errors='replace')}"
                )
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A RedisServer for the run; yields its URL (redis://127.0.0.1:PORT/0)."""
    try:
        server = RedisServer()
    except RedisMissing as exc:
        raise SystemExit(str(exc)) from None
    try:
        yield server.url
    finally:
        server.stop()


# The replica tests' settings: frequent checkpoints (a killed replica loses little), an idle
# timeout short enough to watch Redis expire a session, no message spacing, one thread each
REPLICA_IDLE = 5.0
REPLICA_FLAGS = (
    "--session-checkpoint-s",
    "0.3",
    "--idle-timeout",
    str(REPLICA_IDLE),
    "--max-chars",
    "100000",
    "--stream-interval-ms",
    "0",
    "--max-messages-per-s",
    "0",
    "--threads",
    "1",
    "--grace",
    "2",
)


class Replica:
    """A `nlstm serve` process on the session store `store` (REPLICA_FLAGS, then `flags`, which
    override them), and a gRPC stub to it."""

    def __init__(self, models_dir: Path, store: str, *flags: str) -> None:
        import grpc  # here: the rest of this module runs without a gRPC client

        from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc

        self.server = Server(
            models_dir, "--session-store", store, *REPLICA_FLAGS, *flags, metrics=False
        )
        self.channel = grpc.insecure_channel(self.server.target)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.__exit__(None, None, None)
