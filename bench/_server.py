"""What the serving benchmarks share: a real `nlstm serve` subprocess, its memory and metrics,
small exported models, and pieces of client traffic.

`Server` starts `nlstm serve --port 0` (and `--metrics-port 0` when asked), reads the ports it
picked from its log, and keeps reading the log in a thread so that the pipe never fills and
blocks the server; the lines stay in `Server.log` for the reports. `rss_mib` and
`cpu_seconds` read a process's resident memory and CPU time (psutil when installed, else
/proc). `redis_server()` runs a throwaway `redis-server` for a benchmark's session store. `export_random` writes a random character model with torch, in the calling process
(the server never imports torch); `models_folder` gives a models folder: the one asked for,
or a temporary one of tiny models. `pick_models` and `glimpse_requests` build client traffic.
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
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLED_GLIMPSE = REPO / "exported" / "mnist-nlstm"


def readme_lines() -> list[str]:
    """The README's non-empty lines: the training text of random character models' vocabulary
    and the texts the benchmarks score."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]


def export_random(out: Path, hidden: int, vocab_text: str) -> str:
    """Export a random NLSTM character model (depth 2, a PTB-style tokenizer of vocab_text's
    characters) to out/random-nlstm; returns its name."""
    import torch

    from training.data.tokenizer import train_char_tokenizer
    from training.export import export_model
    from training.models import ModelConfig, build_model

    torch.manual_seed(0)
    tok = train_char_tokenizer(vocab_text.splitlines(), newline=True)
    model = build_model(ModelConfig(kind="char", core="nlstm", hidden_size=hidden, depth=2, vocab_size=tok.vocab_size))
    export_model(model.eval(), out / "random-nlstm", task="ptb", tokenizer=tok.model_proto, sequence="never")
    return "random-nlstm"


def tiny_models(out: Path, hidden: int = 16) -> Path:
    """A models folder for quick runs: a random character model of `hidden` cells and a link
    to the bundled MNIST glimpse classifier (exported/mnist-nlstm). Returns `out`."""
    export_random(out, hidden, "\n".join(readme_lines()))
    (out / BUNDLED_GLIMPSE.name).symlink_to(BUNDLED_GLIMPSE, target_is_directory=True)
    return out


@contextlib.contextmanager
def models_folder(models: Path | None) -> Iterator[Path]:
    """`models`, or when None a temporary folder of tiny_models(), removed afterwards."""
    if models is not None:
        yield models
        return
    with tempfile.TemporaryDirectory(prefix="nlstm-bench-") as tmp:
        yield tiny_models(Path(tmp))


async def pick_models(stub) -> tuple[str, str]:
    """(character model, glimpse classifier): the first of each that the server lists."""
    from serving.api.nlstm.v1 import inference_pb2 as pb

    listed = (await stub.ListModels(pb.ListModelsRequest())).models
    chars = [m.name for m in listed if m.vocab_size]
    glimpses = [m.name for m in listed if m.num_classes]
    if not chars or not glimpses:
        raise SystemExit(
            f"the server runs {[m.name for m in listed]}; this needs a character model and a glimpse "
            "classifier (--tiny exports a random character model beside the bundled mnist-nlstm)"
        )
    return chars[0], glimpses[0]


def glimpse_requests(rng: np.random.Generator, model: str = "", session_id: str = "") -> list:
    """The 20 GlimpseRequests of one random MNIST-like image (about a fifth of the pixels lit,
    as in MNIST); model and session_id go on the first."""
    from serving.api.nlstm.v1 import inference_pb2 as pb
    from serving.formats import image_to_glimpses

    image = ((rng.random((28, 28)) < 0.2) * rng.integers(64, 256, (28, 28))).astype(np.uint8)
    return [pb.GlimpseRequest(model=model if i == 0 else "", session_id=session_id if i == 0 else "",
                              pixels=g.tolist()) for i, g in enumerate(image_to_glimpses(image))]


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
    "    import ctypes; ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
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

    def __init__(self, models: Path, *flags: str, metrics: bool = True, start_timeout: float = 120.0) -> None:
        self.proc = subprocess.Popen(
            die_with_parent([sys.executable, "-m", "training.cli", "serve", "--models", str(models), "--port", "0",
                             "--host", "localhost", "--metrics-port", "0" if metrics else "-1", *flags]),
            stderr=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
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

        with urllib.request.urlopen(f"http://localhost:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return [(s.labels, s.value) for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == name]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return sum(v for have, v in self.samples(name) if all(have.get(k) == x for k, x in labels.items()))

    def errors(self) -> list[str]:
        """Log lines that report an error or a traceback."""
        return [line.rstrip() for line in self.log if " ERROR " in line or line.startswith("Traceback")]

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


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A `redis-server` on a free loopback port, without persistence, for the run; yields its
    URL (redis://127.0.0.1:PORT/0)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(die_with_parent([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                             "--appendonly", "no"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()
