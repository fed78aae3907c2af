"""Prometheus metrics of the server, on their own registry (one per server, so that tests can
run several servers in one process). Names follow Prometheus conventions: a `nlstm_` prefix,
base units (seconds), `_total` for counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "nlstm_requests",
            "RPCs handled, by method and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "nlstm_request_duration_seconds",
            "Wall time of each RPC, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_char = Histogram(
            "nlstm_time_to_first_char_seconds",
            "Generate: from the request to its first character",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.chars_generated = Counter(
            "nlstm_chars_generated", "Characters generated", ["model"], registry=r
        )
        self.chars_scored = Counter(
            "nlstm_chars_scored", "Characters scored", ["model"], registry=r
        )
        self.glimpses = Counter(
            "nlstm_glimpses_classified", "Glimpses classified", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "nlstm_batch_size",
            "Sequences advanced together in one step graph call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "nlstm_step_duration_seconds",
            "Time in one batched step graph call",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.active_sessions = Gauge(
            "nlstm_active_sessions", "Sessions held by the server", registry=r
        )
        self.max_sessions = Gauge(
            "nlstm_max_sessions",
            "The session bound (--max-sessions): more get RESOURCE_EXHAUSTED",
            registry=r,
        )
        self.evictions = Counter(
            "nlstm_session_evictions", "Sessions freed after their idle timeout", registry=r
        )
        self.active_sequences = Gauge(
            "nlstm_active_sequences",
            "Calls (Generate, Score, glimpse streams) the model's scheduler runs",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "nlstm_queue_depth",
            "Sequences ready for the last step that did not fit in its batch "
            "(more than --max-batch)",
            ["model"],
            registry=r,
        )
        # the prefix-state cache (serving/prefix_cache.py, --prefix-cache-mb)
        self.prefix_cache_hits = Counter(
            "nlstm_prefix_cache_hits",
            "Generate calls from the initial state that started from a cached prefix",
            ["model"],
            registry=r,
        )
        self.prefix_cache_misses = Counter(
            "nlstm_prefix_cache_misses",
            "Generate calls from the initial state with no cached prefix",
            ["model"],
            registry=r,
        )
        self.prefix_cache_skipped_chars = Counter(
            "nlstm_prefix_cache_skipped_chars",
            "Prompt characters whose step a cache hit skipped",
            ["model"],
            registry=r,
        )
        self.prefix_cache_bytes = Gauge(
            "nlstm_prefix_cache_bytes",
            "Bytes the prefix-state cache holds for the model (states, logits, trie)",
            ["model"],
            registry=r,
        )
        self.prefix_cache_entries = Gauge(
            "nlstm_prefix_cache_entries",
            "Prefix states the cache holds for the model",
            ["model"],
            registry=r,
        )
        self.prefix_cache_max_bytes = Gauge(
            "nlstm_prefix_cache_max_bytes",
            "The prefix-state cache's bound over all models (--prefix-cache-mb; 0: off)",
            registry=r,
        )
