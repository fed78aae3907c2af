"""Bounds on what requests may make the server hold: the engine's limits on each call
(`Limits`), the receive limit sized from them, the bytes of requests in flight, and a
per-client call rate.

gRPC checks its receive limit after decompression, so a 15 KB gzip request can unpack to the
whole limit: a fixed 16 MiB limit let 32 concurrent ones take the server to 780 MiB. The limit
is therefore derived from the longest request the engine accepts (`request_bytes_needed`), and
`InflightBytes` bounds the sum over every call running: each request message holds its size
in bytes from the moment it is unpacked until its call ends (a stream's message: until the
next one arrives), and one that does not fit is refused with RESOURCE_EXHAUSTED before it is
parsed. How many calls may unpack a message at once is bounded by the server's concurrent
call limit (grpc's maximum_concurrent_rpcs), which refuses the calls beyond it before their
messages are read.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

MIB = 1 << 20

# Protobuf framing and the short fields of a request (model name, session id, numbers), on top
# of its text; a model name or session id longer than this makes the request too large, which
# is right: no real one comes near.
REQUEST_OVERHEAD = 16 << 10


def request_bytes_needed(max_text: int, max_stop: int, max_stop_chars: int) -> int:
    """The largest request the engine accepts, in bytes on the wire after decompression: a
    Generate with a prompt of max_text characters and max_stop stop strings of max_stop_chars
    characters (up to 4 bytes each in UTF-8; a Score's text is bounded by max_text too)."""
    return 4 * (max_text + max_stop * max_stop_chars) + REQUEST_OVERHEAD


@dataclass
class Limits:
    """The engine's limits on calls and its batching settings (flags and environment variables
    of `nlstm serve`); serving/requests.py checks each request against them."""

    max_chars: int = 4096  # most characters one Generate may ask for
    max_text: int = 100_000  # longest Score text or Generate prompt, in characters
    max_sessions: int = 1024
    idle_timeout: float = 600.0  # seconds
    max_batch: int = 64  # sequences advanced together in one step
    max_wait: float = 0.002  # seconds the oldest waiting step waits for company
    # Generate: after a message, a stream's next one waits until this many seconds have passed
    # and carries every character made meanwhile (0: each as soon as it is made, within the
    # message budget below). Each message costs the server about 0.1 ms of Python (gRPC's and
    # ours) on the cores the model needs, and the client as much again.
    stream_interval: float = 0.05
    # Generate: the most messages per second all of one model's streams send together (0: no
    # budget). With n streams running, a stream's messages are at least n / this seconds apart
    # (when that is longer than stream_interval; at most 10 s): 400 keeps 50 ms up to 20
    # streams and spaces 64 streams' messages 160 ms apart, so that messages cost a bounded
    # share of the CPU.
    max_messages_per_s: float = 400.0
    max_stop: int = 4  # stop strings one Generate may give
    # the longest stop string, in characters: each generated character is checked against the
    # stream's stop strings (a tail of this length is kept), and the request holds them
    max_stop_chars: int = 256
    max_glimpses: int = 4096  # glimpses one ClassifyGlimpses stream may send
    # sessions one client (its API key, or its address without keys) may hold; 0: no bound
    # beyond max_sessions
    max_sessions_per_client: int = 0
    # the prefix-state cache's bound over all models, in MiB (serving/prefix_cache.py; 0: off)
    prefix_cache_mb: float = 64.0
    # With a file or Redis session store: how often a running call writes its session (and
    # renews its lease, which lapses after 3 of these, at least
    # serving.engine_sessions.LEASE_MIN: how long a dead replica's sessions stay locked). A
    # replica that dies loses at most this much of a long Generate.
    checkpoint_interval: float = 2.0


@dataclass
class ServerLimits:
    """Transport-level bounds of one server (flags of `nlstm serve`)."""

    # gRPC's receive limit in bytes; 0: request_bytes_needed(...) of the engine's limits
    max_request_bytes: int = 0
    # the most bytes of request messages all calls together may hold (see the module docstring)
    max_inflight_bytes: int = 64 * MIB
    # calls running at once; more are refused with RESOURCE_EXHAUSTED before their request is read
    max_concurrent_calls: int = 4096
    # calls per second one client may start (a token bucket holding two seconds' worth); 0: off
    max_client_requests_per_s: float = 0.0


class OverBudget:
    """What a request message that does not fit in the in-flight budget deserializes to: the
    servicer's interceptor answers RESOURCE_EXHAUSTED without parsing it."""

    def __init__(self, size: int, used: int, limit: int) -> None:
        self.size, self.used, self.limit = size, used, limit

    def message(self) -> str:
        return (
            f"the server is holding {self.used} bytes of requests in flight and this one has "
            f"{self.size}; its limit is {self.limit} bytes: retry later"
        )


class Held:
    """A parsed request and the bytes it holds in the budget, given back when this object goes
    (CPython frees it when the call that received it lets go of it: at the call's end, or at
    a stream's next message)."""

    __slots__ = ("_budget", "_size", "request")

    def __init__(self, budget: InflightBytes, size: int) -> None:
        self.request = None
        self._budget, self._size = budget, size

    def __del__(self) -> None:
        self._budget._release(self._size)


class InflightBytes:
    """The bytes of request messages the server holds, bounded by `limit`."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight byte limit must be >= 1, got {limit}")
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def hold(self, size: int) -> Held | OverBudget:
        with self._lock:
            if self.used + size > self.limit:
                return OverBudget(size, self.used, self.limit)
            self.used += size
        return Held(self, size)

    def _release(self, size: int) -> None:
        with self._lock:
            self.used -= size


class RateLimiter:
    """A token bucket per client: `rate` calls per second on average, bursts of `burst` calls
    (default: two seconds' worth, at least 1). Buckets that have filled up again are forgotten
    (a full bucket is what a new client gets), so memory follows the clients active in the
    last few seconds."""

    SWEEP_EVERY = 1024  # calls between sweeps of the full buckets

    def __init__(self, rate: float, burst: float | None = None, clock=time.monotonic) -> None:
        if not rate > 0:
            raise ValueError(f"the rate must be > 0 calls per second, got {rate}")
        self.rate = rate
        self.burst = max(1.0, 2 * rate) if burst is None else burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self._calls = 0
        self._lock = threading.Lock()

    def allow(self, client: str) -> float:
        """Take a token for one call of `client`: 0.0 when it may go, else the seconds until
        it may."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            self._calls += 1
            if self._calls % self.SWEEP_EVERY == 0:
                self._sweep(now)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0

    def _sweep(self, now: float) -> None:
        full = [
            c
            for c, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.burst
        ]
        for c in full:
            del self._buckets[c]

    def __len__(self) -> int:
        return len(self._buckets)
