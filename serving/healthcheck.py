"""A grpc.health.v1 probe: exit 0 when the server answers SERVING, 1 otherwise.

    python -m serving.healthcheck                       # localhost:$NLSTM_PORT (50051), service ""
    python -m serving.healthcheck --target host:50051 --service nlstm.v1.Inference --timeout 3

The Docker image's HEALTHCHECK runs it, so it reads the port the server was given
(NLSTM_PORT) and needs nothing but grpcio and grpcio-health-checking: no torch, no models.
It prints one line saying what it saw, which `docker inspect` keeps with the health status.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(healthy, what was seen) for one Health.Check call on `target`."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            return False, f"{target}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target} {service or '(server)'}: {status}"


def main(argv: list[str] | None = None) -> int:
    port = os.environ.get("NLSTM_PORT") or "50051"
    p = argparse.ArgumentParser(prog="python -m serving.healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("--target", default=f"localhost:{port}",
                   help="server address (default: localhost:$NLSTM_PORT, else localhost:50051)")
    p.add_argument("--service", default="",
                   help='service to ask about: "" for the whole server (default) or nlstm.v1.Inference')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error(f"--timeout must be > 0, got {args.timeout}")
    healthy, seen = check(args.target, args.service, args.timeout)
    print(seen, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
