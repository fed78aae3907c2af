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
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.engine import Engine, Limits
from serving.metrics import Metrics
from serving.servicer import SERVICE, ErrorsAndMetrics, InferenceServicer

log = logging.getLogger("nlstm.serving")

# On shutdown, a Generate still running this many seconds before the grace period ends is
# stopped, so that its stream ends with FINISH_REASON_CANCELLED rather than being cut off
# (UNAVAILABLE) with the calls the server cancels at the end.
GENERATE_END_MARGIN = 0.5


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


async def build_server(models: dict, *, port: int = 0, host: str = "[::]", limits: Limits | None = None,
                       metrics: Metrics | None = None, max_message_bytes: int = 16 << 20) -> Running:
    metrics = metrics or Metrics()
    engine = Engine(models, limits, metrics)
    server = grpc.aio.server(
        interceptors=[ErrorsAndMetrics(metrics)],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # gRPC sets SO_REUSEPORT by default on Linux: a second server on a port in use would
            # start and share it, each call reaching either one. A port in use is an error.
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Inference"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio raises "Failed to bind to address ..." (older ones return 0)
        bound = 0
    if bound == 0:
        raise OSError(
            f"cannot listen on port {port} ({host}): {_why_not_bound(host, port)}; stop what holds "
            "it or pass --port N (0 picks a free port)"
        )
    engine.start()  # its scheduler thread only once the port is ours
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, bound, engine, health_servicer, metrics)


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
    stopping = asyncio.ensure_future(running.server.stop(grace))
    await asyncio.wait({stopping}, timeout=max(0.0, grace - GENERATE_END_MARGIN))
    running.engine.end_generation()
    await stopping
    await running.engine.close()


async def serve(models_dir: str | Path, *, port: int = 50051, host: str = "[::]", metrics_port: int | None = 9090,
                limits: Limits | None = None, grace: float = 10.0, runtime_options: dict | None = None,
                ready=None) -> None:
    """Run until SIGTERM or SIGINT. `ready(running)` is called once the port is bound."""
    models = load_models(models_dir, **(runtime_options or {}))
    metrics = Metrics()
    if metrics_port is not None:
        from prometheus_client import start_http_server

        try:
            http, _ = start_http_server(metrics_port, registry=metrics.registry)
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on port {metrics_port}: {exc.strerror or exc} (another nlstm "
                "serve?); pass --metrics-port N, or -1 to turn metrics off"
            ) from None
        log.info("metrics on http://0.0.0.0:%d/metrics", http.server_port)
    running = await build_server(models, port=port, host=host, limits=limits, metrics=metrics)
    log.info("serving %s on port %d", ", ".join(sorted(models)), running.port)
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
            running.engine.expire_sessions()

    expiry = asyncio.create_task(expire_forever())
    await stop.wait()
    log.info("shutting down: draining calls for up to %.1f s", grace)
    expiry.cancel()
    await shutdown(running, grace)
    log.info("stopped")
