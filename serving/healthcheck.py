"""A grpc.health.v1 probe: exit 0 when the server answers SERVING, 1 otherwise.

    python -m serving.healthcheck                       # localhost:$NLSTM_PORT (50051), service ""
    python -m serving.healthcheck --target host:50051 --service nlstm.v1.Inference --timeout 3

The Docker image's HEALTHCHECK runs it, so it reads the port the server was given
(NLSTM_PORT) and needs nothing but grpcio and grpcio-health-checking: no torch, no models.
It prints one line saying what it saw, which `docker inspect` keeps with the health status.
A server with TLS is asked over TLS when NLSTM_TLS_CA (or --tls-ca) names the CA of its
certificate (with --tls-server-name when the certificate is not for localhost; for mutual TLS,
NLSTM_TLS_CLIENT_CERT and NLSTM_TLS_CLIENT_KEY); health checks need no API key.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(
    target: str, tls_ca: str | None, server_name: str | None, cert: str | None, key: str | None
) -> grpc.Channel:
    if not tls_ca:
        return grpc.insecure_channel(target)
    from serving.auth import channel_credentials

    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(
        target, channel_credentials(tls_ca, cert or None, key or None), options
    )


def check(
    target: str,
    service: str = "",
    timeout: float = 3.0,
    tls_ca: str | None = None,
    server_name: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> tuple[bool, str]:
    """(healthy, what was seen) for one Health.Check call on `target` (over TLS with tls_ca)."""
    with _channel(target, tls_ca, server_name, cert, key) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            # the stubs' HealthStub lacks the methods its __init__ adds
            reply = stub.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            return False, f"{target}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return (
        reply.status == health_pb2.HealthCheckResponse.SERVING,
        f"{target} {service or '(server)'}: {status}",
    )


def main(argv: list[str] | None = None) -> int:
    port = os.environ.get("NLSTM_PORT") or "50051"
    p = argparse.ArgumentParser(
        prog="python -m serving.healthcheck", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--target",
        default=f"localhost:{port}",
        help="server address (default: localhost:$NLSTM_PORT, else localhost:50051)",
    )
    p.add_argument(
        "--service",
        default="",
        help='service to ask about: "" for the whole server (default) or nlstm.v1.Inference',
    )
    p.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)"
    )
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("NLSTM_TLS_CA") or None,
        help="ask over TLS, trusting this PEM CA (default: $NLSTM_TLS_CA; unset: plaintext)",
    )
    p.add_argument(
        "--tls-server-name", default=None, help="the name the server's certificate is for"
    )
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error(f"--timeout must be > 0, got {args.timeout}")
    try:
        healthy, seen = check(
            args.target,
            args.service,
            args.timeout,
            args.tls_ca,
            args.tls_server_name,
            os.environ.get("NLSTM_TLS_CLIENT_CERT"),
            os.environ.get("NLSTM_TLS_CLIENT_KEY"),
        )
    except (OSError, ValueError) as exc:  # an unreadable CA or client certificate
        healthy, seen = False, f"{args.target}: {exc}"
    print(seen, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
