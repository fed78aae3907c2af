"""Building and running the gRPC server.

`build_server(...)` loads nothing and binds a port (0 picks a free one) and returns the
started pieces, so tests run an in-process server; `serve(...)` adds the Prometheus HTTP
endpoint, session expiry, and the SIGTERM drain: health turns NOT_SERVING, new calls get
UNAVAILABLE, calls in flight get `grace` seconds to finish (a Generate still running near the
end is stopped and ends with FINISH_REASON_CANCELLED), then the process exits.
Never imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.auth import ApiKeys, Gate
from serving.engine import Engine, Limits
from serving.limits import InflightBytes, RateLimiter, ServerLimits, request_bytes_needed
from serving.metrics import Metrics
from serving.servicer import SERVICE, ErrorsAndMetrics, InferenceServicer
from serving.store import Backend, open_backend

if TYPE_CHECKING:
    from serving.http import HttpFront

log = logging.getLogger("nlstm.serving")

# On shutdown, a Generate still running this many seconds before the grace period ends is
# stopped, so that its stream ends with FINISH_REASON_CANCELLED rather than being cut off
# (UNAVAILABLE) with the calls the server cancels at the end.
GENERATE_END_MARGIN = 0.5

# A connection with no call for this long is closed (GOAWAY; a client's channel reconnects on
# its next call), and one that has not finished its HTTP/2 (and TLS) handshake after
# HANDSHAKE_TIMEOUT_MS is dropped: idle connections cost the server memory, whoever opened them.
CONNECTION_IDLE_MS = 300_000
HANDSHAKE_TIMEOUT_MS = 20_000


def load_models(models_dir: str | Path, **runtime_options) -> dict:
    """Every exported model folder (one with a meta.json) directly under models_dir, by name."""
    from serving.formats import META_FILE
    from serving.runtime import load_model

    root = Path(models_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"models directory {root} does not exist")
    folders = sorted(p for p in root.iterdir() if (p / META_FILE).is_file())
    if not folders:
        raise FileNotFoundError(f"no exported models (folders with {META_FILE}) under {root}")
    return {p.name: load_model(p, **runtime_options) for p in folders}


@dataclass
class Running:
    server: grpc.aio.Server
    port: int
    engine: Engine
    health: health.aio.HealthServicer
    metrics: Metrics
    http: HttpFront | None = None  # the HTTP/JSON front (serving.http), when asked for
    http_port: int = 0


def receive_limit(limits: Limits, server_limits: ServerLimits) -> int:
    """gRPC's receive limit: the setting, or the longest request the engine accepts. A setting
    below that would refuse requests the engine allows, so it is an error."""
    needed = request_bytes_needed(limits.max_text, limits.max_stop, limits.max_stop_chars)
    if server_limits.max_request_bytes == 0:
        return needed
    if server_limits.max_request_bytes < needed:
        raise ValueError(
            f"max_request_bytes {server_limits.max_request_bytes} is below the {needed} bytes "
            f"a request within the other limits may take (max_text {limits.max_text} "
            f"characters and {limits.max_stop} stop strings of {limits.max_stop_chars}, "
            f"4 bytes a character in UTF-8, and {16 << 10} for the rest); "
            "raise it, or lower max_text"
        )
    return server_limits.max_request_bytes


async def build_server(
    models: dict,
    *,
    port: int = 0,
    host: str = "[::]",
    limits: Limits | None = None,
    metrics: Metrics | None = None,
    server_limits: ServerLimits | None = None,
    api_keys: ApiKeys | None = None,
    tls: grpc.ServerCredentials | None = None,
    snapshot_key: bytes | None = None,
    session_store: str | Backend | None = "memory",
    http_port: int | None = None,
    http_ssl: ssl.SSLContext | None = None,
) -> Running:
    """Start the engine and a gRPC server on host:port (plaintext, or TLS with `tls`); with
    `api_keys`, every call but health checks needs one (serving.auth). `session_store`: where
    sessions live (serving.store.open_backend's URL, or a Backend). With `http_port`, the
    HTTP/JSON front too (serving.http, TLS with `http_ssl`), on the same host, engine, keys,
    rate limiter and in-flight byte budget."""
    metrics = metrics or Metrics()
    limits = limits or Limits()
    server_limits = server_limits or ServerLimits()
    max_request = receive_limit(limits, server_limits)
    if server_limits.max_inflight_bytes < max_request:
        raise ValueError(
            f"max_inflight_bytes {server_limits.max_inflight_bytes} is below the receive limit "
            f"({max_request} bytes): the largest request allowed could never be served"
        )
    rate = (
        RateLimiter(server_limits.max_client_requests_per_s)
        if server_limits.max_client_requests_per_s > 0
        else None
    )
    engine = Engine(models, limits, metrics, snapshot_key=snapshot_key, session_store=session_store)
    engine.start()
    # outermost first: every call is counted, whatever ends it. The Gate names each call's
    # client; without keys, a rate or a per-client session bound nobody asks, and its extra
    # layer on every message is saved.
    budget = InflightBytes(server_limits.max_inflight_bytes)  # one budget for gRPC and HTTP
    interceptors: list[grpc.aio.ServerInterceptor] = [ErrorsAndMetrics(metrics, budget)]
    if api_keys is not None or rate is not None or limits.max_sessions_per_client:
        interceptors.append(Gate(api_keys, rate))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_request),
            # the longest answer: a per-character Score of max_text characters (a float, and a
            # boundary character per HM-LSTM layer, each); 16 MiB unless max_text needs more
            ("grpc.max_send_message_length", max(16 << 20, 12 * limits.max_text + (64 << 10))),
            ("grpc.max_connection_idle_ms", CONNECTION_IDLE_MS),
            ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
            # gRPC sets SO_REUSEPORT by default on Linux: a second server on a port in use would
            # start and share it, each call reaching either one. A port in use is an error.
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=server_limits.max_concurrent_calls,
    )
    servicer = InferenceServicer(engine)
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["Inference"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{host}:{port}"
    try:
        bound = (
            server.add_secure_port(address, tls)
            if tls is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:  # grpcio raises "Failed to bind to address ..." (older ones return 0)
        bound = 0
    if bound == 0:
        await engine.close()
        raise OSError(
            f"cannot listen on port {port} ({host}): {_why_not_bound(host, port)}; stop what holds "
            "it or pass --port N (0 picks a free port)"
        )
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = Running(server, bound, engine, health_servicer, metrics)
    if http_port is not None:
        from serving.http import HttpFront

        running.http = HttpFront(
            servicer,
            health_servicer,
            metrics,
            keys=api_keys,
            rate=rate,
            budget=budget,
            max_body=max_request,
            max_concurrent=server_limits.max_concurrent_calls,
        )
        try:
            running.http_port = await running.http.start(host, http_port, http_ssl)
        except OSError:
            await shutdown(running, 0)
            raise
    return running


def _why_not_bound(host: str, port: int) -> str:
    """Why gRPC could not bind: whether a plain socket can (gRPC's own error says neither)."""
    import errno
    import socket

    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "the port is already in use (another nlstm serve?)"
        return f"{exc.strerror or exc}"
    return "gRPC could not bind it (GRPC_VERBOSITY=debug says why)"


async def shutdown(running: Running, grace: float) -> None:
    """NOT_SERVING, refuse new work, let calls in flight finish within `grace` seconds: a
    Generate still running GENERATE_END_MARGIN before the end is stopped (its stream ends with
    FINISH_REASON_CANCELLED); calls still running at the end are cancelled (UNAVAILABLE)."""
    await running.health.enter_graceful_shutdown()
    running.engine.closing = True
    stopping: asyncio.Future = asyncio.ensure_future(running.server.stop(grace))
    if running.http is not None:
        stopping = asyncio.gather(stopping, running.http.stop(grace))
    await asyncio.wait({stopping}, timeout=max(0.0, grace - GENERATE_END_MARGIN))
    running.engine.end_generation()
    await stopping
    await running.engine.close()


async def serve(
    models_dir: str | Path,
    *,
    port: int = 50051,
    host: str = "[::]",
    metrics_port: int | None = 9090,
    metrics_host: str | None = None,
    limits: Limits | None = None,
    grace: float = 10.0,
    runtime_options: dict | None = None,
    server_limits: ServerLimits | None = None,
    api_keys: ApiKeys | None = None,
    tls: grpc.ServerCredentials | None = None,
    ready=None,
    snapshot_key: bytes | None = None,
    session_store: str = "memory",
    http_port: int | None = None,
    http_ssl: ssl.SSLContext | None = None,
) -> None:
    """Run until SIGTERM or SIGINT. `ready(running)` is called once the port is bound. The
    metrics endpoint listens on metrics_host (default: host); with http_port, the HTTP/JSON
    front and the playground page on host too."""
    from serving.metrics_http import MetricsServer

    store = open_backend(session_store)  # a bad URL fails now, before the models load
    models = load_models(models_dir, **(runtime_options or {}))
    metrics = Metrics()
    http = None
    if metrics_port is not None:
        http = MetricsServer(metrics.registry)
        try:
            await http.start(metrics_host if metrics_host is not None else host, metrics_port)
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on port {metrics_port}: {exc.strerror or exc} "
                "(another nlstm serve?); pass --metrics-port N, or -1 to turn metrics off"
            ) from None
        for address, bound_port in http.addresses():
            log.info(
                "metrics on http://%s:%d/metrics",
                f"[{address}]" if ":" in address else address,
                bound_port,
            )
    running = await build_server(
        models,
        port=port,
        host=host,
        limits=limits,
        metrics=metrics,
        server_limits=server_limits,
        api_keys=api_keys,
        tls=tls,
        snapshot_key=snapshot_key,
        session_store=store,
        http_port=http_port,
        http_ssl=http_ssl,
    )
    if running.http is not None:
        log.info(
            "HTTP/JSON and the playground on %s://%s:%d/",
            "https" if http_ssl else "http",
            host,
            running.http_port,
        )
    if api_keys is not None and tls is None:
        log.warning(
            "API keys without TLS: keys cross the network in clear text "
            "(use --tls-cert and --tls-key)"
        )
    log.info(
        "serving %s on port %d%s%s",
        ", ".join(sorted(models)),
        running.port,
        " with TLS" if tls else "",
        f", {len(api_keys)} API keys" if api_keys else "",
    )
    if ready is not None:
        ready(running)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def expire_forever():
        period = max(1.0, min(30.0, running.engine.limits.idle_timeout / 4))
        while True:
            await asyncio.sleep(period)
            await loop.run_in_executor(
                None, running.engine.expire_sessions
            )  # a file store sweeps a folder

    expiry = asyncio.create_task(expire_forever())
    await stop.wait()
    log.info("shutting down: draining calls for up to %.1f s", grace)
    expiry.cancel()
    await shutdown(running, grace)
    if http is not None:
        await http.close()
    log.info("stopped")
