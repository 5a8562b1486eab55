#!/usr/bin/env python3
"""Exit 0 when a simclr server answers the standard gRPC health check with SERVING, else 1.

The container's ``HEALTHCHECK`` runs it (no extra binary in the image: grpcio and
grpcio-health-checking are already there). Kubernetes does not need it: its probes speak gRPC
health natively (``grpc: {port: 50051}``, see ``deploy/k8s.yaml``).

    simclr-healthcheck [TARGET] [--service NAME] [--timeout S] [--tls-ca PEM]

TARGET defaults to ``$SIMCLR_HEALTH_TARGET`` or ``127.0.0.1:50051``. The health service never
needs the auth token. Prints one line (the status, or why the check failed).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def check(target: str, service: str = "", timeout: float = 3.0, tls_ca: str | None = None) -> str:
    """The health status name (``SERVING``, ``NOT_SERVING``, ...) of ``service`` at ``target``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls_ca is not None:
        with open(tls_ca, "rb") as f:
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(f.read()))
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="simclr-healthcheck", description=__doc__.splitlines()[0])
    p.add_argument(
        "target",
        nargs="?",
        default=os.environ.get("SIMCLR_HEALTH_TARGET", "127.0.0.1:50051"),
        help="HOST:PORT [$SIMCLR_HEALTH_TARGET or 127.0.0.1:50051]",
    )
    p.add_argument("--service", default="", help="service name; '' = the whole server ['']")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds [3]")
    p.add_argument("--tls-ca", default=None, help="CA bundle (PEM) when the server uses TLS")
    args = p.parse_args(argv)
    try:
        status = check(args.target, args.service, args.timeout, args.tls_ca)
    except Exception as exc:  # unreachable, deadline, TLS mismatch: all mean "not healthy"
        code = getattr(exc, "code", None)
        reason = code().name if callable(code) else type(exc).__name__
        print(f"unhealthy: {args.target}: {reason}")
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
