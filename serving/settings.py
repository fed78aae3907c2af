"""The allowed range of every numeric setting of `nlstm serve`, checked once at start.

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
from collections.abc import Mapping
from dataclasses import dataclass

MIB = 1 << 20


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
