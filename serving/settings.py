"""The settings of `nlstm serve`: every flag's type, default and help (`SERVE_FLAGS`, the one
table the command builds its parser from), and the allowed range of every numeric one, checked
once at start.

Each flag's default can be set by the environment variable NLSTM_<NAME> (the flag's name in
capitals, dashes as underscores), which its help names in brackets; `env_default` reads it, for
the other commands' flags too.

A value out of range used to be accepted and fail later, call by call (`--idle-timeout 5e9`
made every CreateSession INTERNAL: the proto's uint32 cannot hold it; `--max-wait-ms inf`
let one half-open glimpse stream stall the others). `check_serve_settings` rejects it before
anything is loaded, with an error that names the flag, the range and the value. Each range is
finite, positive where zero or less means nothing, and fits the proto field that reports the
value (idle_timeout_seconds is a uint32). The `nlstm` command calls it with its parsed flags;
the README and `nlstm serve --help` quote the same ranges.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1 << 20
BUNDLED_MODELS = Path(__file__).resolve().parents[1] / "exported"  # the models the repo ships


def env_default(name: str, default, cast=str):
    """A flag's default from the environment variable NLSTM_<NAME>, else `default`."""
    value = os.environ.get(f"NLSTM_{name}")
    if value is None or value == "":
        return default
    try:
        return cast(value)
    except ValueError:
        raise SystemExit(
            f"nlstm: environment variable NLSTM_{name}={value!r} is not a valid {cast.__name__}"
        ) from None


@dataclass(frozen=True)
class Flag:
    """One flag of `nlstm serve`: --NAME (underscores as dashes), the type its value is read as
    (str, int, float or Path), its default when neither the flag nor NLSTM_<NAME> is given, and
    its help."""

    name: str
    type: type
    default: Any
    help: str

    @property
    def env(self) -> str:
        """The environment variable that sets the default, without its NLSTM_ prefix."""
        return self.name.upper()


# in the order `nlstm serve --help` lists them
SERVE_FLAGS: tuple[Flag, ...] = (
    Flag(
        "models",
        Path,
        BUNDLED_MODELS,
        "folder of exported models, one per sub-folder; a model's name is its folder's "
        "[NLSTM_MODELS] (default: the bundled exported/)",
    ),
    Flag("host", str, "[::]", "address to bind [NLSTM_HOST] (default: all)"),
    Flag(
        "port",
        int,
        50051,
        "gRPC port; 0 picks a free one and logs it [NLSTM_PORT] (default: 50051)",
    ),
    Flag(
        "http_port",
        int,
        None,
        "also serve HTTP/JSON (the KServe v2 routes, docs/http.md) and the playground page on "
        "this port, bound to --host; off unless set [NLSTM_HTTP_PORT]",
    ),
    Flag(
        "metrics_port",
        int,
        9090,
        "Prometheus /metrics HTTP port; -1 turns it off [NLSTM_METRICS_PORT] (default: 9090)",
    ),
    Flag(
        "metrics_host",
        str,
        None,
        "address the metrics endpoint binds (it has no authentication) [NLSTM_METRICS_HOST] "
        "(default: --host)",
    ),
    Flag(
        "max_sessions",
        int,
        1024,
        "sessions held at once; more get RESOURCE_EXHAUSTED [NLSTM_MAX_SESSIONS] (default: 1024)",
    ),
    Flag(
        "max_sessions_per_client",
        int,
        0,
        "sessions one client (its API key, or its address without --api-keys-file) may hold; "
        "0: no bound [NLSTM_MAX_SESSIONS_PER_CLIENT] (default: 0)",
    ),
    Flag(
        "max_client_requests_per_s",
        float,
        0.0,
        "calls per second one client may start, in bursts of twice that; more get "
        "RESOURCE_EXHAUSTED; 0: no limit [NLSTM_MAX_CLIENT_REQUESTS_PER_S] (default: 0)",
    ),
    Flag(
        "idle_timeout",
        float,
        600.0,
        "seconds after which an unused session is freed, 1 to 31536000 [NLSTM_IDLE_TIMEOUT] "
        "(default: 600)",
    ),
    Flag(
        "max_batch",
        int,
        64,
        "sequences advanced together in one step [NLSTM_MAX_BATCH] (default: 64)",
    ),
    Flag(
        "max_wait_ms",
        float,
        2.0,
        "how long the oldest waiting step waits to fill a batch, 0 to 1000 "
        "[NLSTM_MAX_WAIT_MS] (default: 2)",
    ),
    Flag(
        "stream_interval_ms",
        float,
        50.0,
        "Generate: the least time between two messages of a stream, each carrying every "
        "character made meanwhile (the first is sent at once); 0 sends each as it is made, within "
        "--max-messages-per-s [NLSTM_STREAM_INTERVAL_MS] (default: 50)",
    ),
    Flag(
        "max_messages_per_s",
        float,
        400.0,
        "Generate: the most messages per second all of one model's streams send together; "
        "with N streams each stream's messages are at least N / this seconds apart (at most 10 s) "
        "when that is longer than --stream-interval-ms (400: 50 ms up to 20 streams, 160 ms at "
        "64); 0 turns the budget off [NLSTM_MAX_MESSAGES_PER_S] (default: 400)",
    ),
    Flag(
        "max_chars",
        int,
        4096,
        "most characters one Generate may ask for [NLSTM_MAX_CHARS] (default: 4096)",
    ),
    Flag(
        "max_text",
        int,
        100_000,
        "longest Score text or prompt in characters [NLSTM_MAX_TEXT] (default: 100000)",
    ),
    Flag(
        "max_stop_chars",
        int,
        256,
        "longest Generate stop string in characters [NLSTM_MAX_STOP_CHARS] (default: 256)",
    ),
    Flag(
        "max_glimpses",
        int,
        4096,
        "glimpses one ClassifyGlimpses stream may send [NLSTM_MAX_GLIMPSES] (default: 4096)",
    ),
    Flag(
        "max_request_bytes",
        int,
        0,
        "largest request message in bytes after decompression; 0 sizes it from --max-text and "
        "the stop limits (4 bytes a character + 16 KiB) [NLSTM_MAX_REQUEST_BYTES] (default: 0)",
    ),
    Flag(
        "max_inflight_bytes",
        int,
        64 << 20,
        "bytes of request messages all running calls together may hold; more get "
        "RESOURCE_EXHAUSTED [NLSTM_MAX_INFLIGHT_BYTES] (default: 67108864)",
    ),
    Flag(
        "max_concurrent_calls",
        int,
        4096,
        "calls running at once; more get RESOURCE_EXHAUSTED before their request is read "
        "[NLSTM_MAX_CONCURRENT_CALLS] (default: 4096)",
    ),
    Flag(
        "tls_cert",
        Path,
        None,
        "PEM certificate chain: serve over TLS (with --tls-key) [NLSTM_TLS_CERT]",
    ),
    Flag("tls_key", Path, None, "PEM private key of --tls-cert [NLSTM_TLS_KEY]"),
    Flag(
        "tls_client_ca",
        Path,
        None,
        "PEM CA: mutual TLS, every client must present a certificate it signed "
        "[NLSTM_TLS_CLIENT_CA]",
    ),
    Flag(
        "api_keys_file",
        Path,
        None,
        "file of API keys, one a line: every call but health checks must send 'authorization: "
        "Bearer KEY', and sessions belong to the key that created them [NLSTM_API_KEYS_FILE]",
    ),
    Flag(
        "prefix_cache_mb",
        int,
        64,
        "MiB of prompt-prefix states kept so that calls sharing a prompt's opening skip its "
        "prefill (docs/serving.md); 0 turns the cache off [NLSTM_PREFIX_CACHE_MB] (default: 64)",
    ),
    Flag(
        "grace",
        float,
        10.0,
        "seconds calls in flight get to finish on SIGTERM [NLSTM_GRACE] (default: 10)",
    ),
    Flag(
        "threads",
        int,
        0,
        "onnxruntime intra-op threads per model; 0 lets onnxruntime choose [NLSTM_THREADS]",
    ),
    Flag(
        "providers",
        str,
        "auto",
        "onnxruntime providers: auto (CUDA when a session gets it, else CPU), cpu or cuda "
        "[NLSTM_PROVIDERS]",
    ),
    Flag(
        "snapshot_key_file",
        Path,
        None,
        "file holding a secret of at least 16 bytes (e.g. `openssl rand -hex 32`; surrounding "
        "whitespace is ignored): SnapshotSession signs snapshots with it (HMAC-SHA256) and "
        "RestoreSession refuses snapshots it did not sign [NLSTM_SNAPSHOT_KEY_FILE] (default: "
        "none, snapshots are checksummed only)",
    ),
    Flag(
        "session_store",
        str,
        "memory",
        "where sessions live: memory (this process), file:DIR (survives a restart on the same "
        "DIR) or redis://HOST:PORT/DB (shared by replicas: any replica serves any session) "
        "[NLSTM_SESSION_STORE] (default: memory)",
    ),
    Flag(
        "session_checkpoint_s",
        float,
        2.0,
        "file or Redis store: how often a running call writes its session and renews its "
        "lease (a dead replica's sessions are free again after 3 of these, at least 2 s) "
        "[NLSTM_SESSION_CHECKPOINT_S] (default: 2)",
    ),
    Flag("log_level", str, "INFO", "logging level [NLSTM_LOG_LEVEL]"),
)


@dataclass(frozen=True)
class Range:
    """[low, high] (low excluded when low_open); integer: whole numbers only. `unit` and
    `note` go into the error message."""

    low: float
    high: float
    integer: bool = False
    unit: str = ""
    note: str = ""
    low_open: bool = False

    def allows(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):  # NaN compares false both ways: test it first
            return False
        if self.integer and value != int(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def describe(self) -> str:
        lo = "(" if self.low_open else "["
        kind = "a whole number" if self.integer else "a finite number"
        unit = f" {self.unit}" if self.unit else ""
        note = f"; {self.note}" if self.note else ""
        return f"{kind} in {lo}{_num(self.low)}, {_num(self.high)}]{unit}{note}"


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


# flag (without the leading dashes, dashes as underscores) -> its range
SERVE_RANGES: dict[str, Range] = {
    "port": Range(0, 65535, integer=True, note="0 picks a free port"),
    "http_port": Range(0, 65535, integer=True, note="0 picks a free port; unset: no HTTP"),
    "metrics_port": Range(
        -1, 65535, integer=True, note="-1 turns the endpoint off, 0 picks a free port"
    ),
    "max_sessions": Range(1, 1_000_000, integer=True),
    "max_sessions_per_client": Range(0, 1_000_000, integer=True, note="0: no per-client bound"),
    "max_client_requests_per_s": Range(
        0, 1_000_000, unit="calls per second", note="0: no rate limit"
    ),
    # reported to clients as Session.idle_timeout_seconds (uint32, whole seconds): at least 1 s
    # so that it never reads 0, at most a year
    "idle_timeout": Range(1, 31_536_000, unit="seconds"),
    "max_batch": Range(1, 4096, integer=True),
    # the longest the scheduler holds a ready step back for a stream that is not ready: past a
    # second it is a stall, not batching
    "max_wait_ms": Range(0, 1000, unit="ms"),
    "stream_interval_ms": Range(0, 10_000, unit="ms", note="0 sends each character as it is made"),
    "max_messages_per_s": Range(0, 1_000_000, note="0: no budget"),
    "max_chars": Range(1, 1_000_000, integer=True, unit="characters"),
    "max_text": Range(1, 10_000_000, integer=True, unit="characters"),
    "max_stop_chars": Range(1, 4096, integer=True, unit="characters"),
    "max_glimpses": Range(1, 1_000_000, integer=True, unit="glimpses per stream"),
    "max_request_bytes": Range(
        0,
        256 * MIB,
        integer=True,
        unit="bytes",
        note="0: sized from --max-text and the stop-string limits",
    ),
    "max_inflight_bytes": Range(MIB, 64 * 1024 * MIB, integer=True, unit="bytes"),
    "max_concurrent_calls": Range(1, 1_000_000, integer=True),
    "prefix_cache_mb": Range(0, 1 << 20, integer=True, unit="MiB", note="0 turns the cache off"),
    # file or Redis store: how often a running call writes its session and renews its lease
    "session_checkpoint_s": Range(0.05, 600, unit="seconds"),
    "grace": Range(0, 3600, unit="seconds"),
    "threads": Range(0, 1024, integer=True, note="0 lets onnxruntime choose"),
}


def check_serve_settings(values: Mapping[str, object]) -> None:
    """Raise ValueError for the first value in `values` (flag name -> value, as argparse
    names them) outside its range in SERVE_RANGES; names without a range are not checked."""
    for name, rng in SERVE_RANGES.items():
        if values.get(name) is None:  # not given, or an optional flag left unset (--http-port)
            continue
        value = values[name]
        if not rng.allows(value):  # type: ignore[arg-type]
            raise ValueError(f"--{name.replace('_', '-')} must be {rng.describe()}, got {value!r}")
