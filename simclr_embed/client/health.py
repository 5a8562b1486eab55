"""Is a server there, and if not, why: one probe that names the problem in words a user can act
on, a wait that says it while waiting, and the ``simclr health`` command.

    simclr health --target 127.0.0.1:50051 [--tls | --tls-ca ca.pem] [--token T]
    # exit 0 and "127.0.0.1:50051: SERVING (model 03aa...)", else exit 1 and why

The same check the Docker ``HEALTHCHECK`` runs: the standard ``grpc.health.v1`` service (no token
needed), then — only when a token is given or the server wants one — ``GetModelInfo``, so a wrong
token is reported as such rather than as a failed bulk job later.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from simclr_embed.client.base import INFO_REQUEST
from simclr_embed.client.channel import SERVICE, credentials, grpc_target, make_channel
from simclr_embed.errors import SimclrError, run_main
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc

TOKEN_ENV = "SIMCLR_AUTH_TOKEN"
DEFAULT_WAIT_S = 30.0  # simclr embed --wait-s: a restart or a model load fits; a typo does not
_SCHEMES = ("http://", "https://", "grpc://", "grpcs://")


@dataclass(frozen=True)
class Probe:
    """One look at a target: ``serving`` and, when not, ``reason`` (one line); ``final``: waiting
    will not help (a wrong token, TLS mismatch, not our server)."""

    serving: bool
    reason: str
    final: bool = False
    model_version: str = ""


def check_target(spec: str) -> str:
    """A ``--target`` value → a gRPC target, or ``SimclrError`` with a hint for a URL."""
    for scheme in _SCHEMES:
        if spec.startswith(scheme):
            rest = spec[len(scheme) :].rstrip("/")
            tls = " with --tls" if scheme in ("https://", "grpcs://") else ""
            raise SimclrError(
                f"--target {spec}: a gRPC HOST:PORT is expected, not a URL; try --target {rest}"
                f"{tls} (the gRPC port of simclr serve, 50051 by default)"
            )
    try:
        return grpc_target(spec)
    except ValueError as exc:
        raise SimclrError(str(exc)) from None


def _explain(exc: grpc.RpcError, target: str, tls: bool) -> Probe:
    code, details = exc.code(), (exc.details() or "").strip()
    low = details.lower()
    if code == grpc.StatusCode.UNAVAILABLE:
        if "connection refused" in low or "connect failed" in low:
            return Probe(False, f"connection refused: nothing listens at {target} (is simclr serve running there?)")  # fmt: skip
        if "dns" in low or "resolve" in low or "name or service not known" in low:
            return Probe(False, f"cannot resolve the host name of {target}")
        if "ssl" in low or "handshake" in low or "tls" in low or "certificate" in low:
            hint = ("the server does not speak TLS: drop --tls" if tls
                    else "the server speaks TLS: add --tls (or --tls-ca CA.pem)")  # fmt: skip
            return Probe(False, f"TLS handshake failed ({hint})", final=not tls)
        if "socket closed" in low or "http" in low or "protocol" in low:
            hint = "add --tls if the server uses TLS; " if not tls else ""
            return Probe(False, f"{target} closed the connection ({hint}is it a gRPC port?)")
        return Probe(False, f"unavailable: {details or 'no connection'}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Probe(False, f"no answer from {target} in time (not a gRPC server, or overloaded)")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return Probe(False, f"{target} has no gRPC health service: not a simclr serve", final=True)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Probe(False, f"the server refused the token: {details} (--token / ${TOKEN_ENV})", final=True)  # fmt: skip
    return Probe(False, f"{code.name}: {details}")


def probe(
    target: str, *, tls: bool | Path = False, token: str | None = None, timeout: float = 5.0
) -> Probe:
    """Ask health once (fails fast); when SERVING, check the token with ``GetModelInfo``."""
    creds = credentials(tls)
    channel = make_channel(target, creds, [], aio=False)
    try:
        try:
            r = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout
            )
        except grpc.RpcError as exc:
            return _explain(exc, target, tls is not False)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        if status != "SERVING":
            return Probe(False, f"{status} (starting up: loading the model, or draining)")
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            info = pb_grpc.EmbeddingServiceStub(channel).GetModelInfo(
                INFO_REQUEST, timeout=timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED and not token:
                return Probe(False, f"the server wants a token: --token or ${TOKEN_ENV}", final=True)  # fmt: skip
            return _explain(exc, target, tls is not False)
        return Probe(True, "SERVING", model_version=info.model_version)
    finally:
        channel.close()


def wait_for_serving(
    target: str,
    *,
    wait_s: float = DEFAULT_WAIT_S,
    tls: bool | Path = False,
    token: str | None = None,
    say: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Probe:
    """Probe until SERVING; ``say`` each new reason at once (and again every 10 s while it holds);
    ``SimclrError`` with the last reason after ``wait_s`` or on a problem waiting cannot fix."""
    end, said, said_at = clock() + wait_s, "", 0.0
    while True:
        p = probe(target, tls=tls, token=token, timeout=min(5.0, max(0.5, wait_s)))
        if p.serving:
            return p
        now = clock()
        if p.final:
            raise SimclrError(f"{target}: {p.reason}")
        if now >= end:
            raise SimclrError(f"{target}: no SERVING server after {wait_s:g} s: {p.reason} (--wait-s)")  # fmt: skip
        if say is not None and (p.reason != said or now - said_at >= 10.0):
            say(f"waiting for {target} (up to {wait_s:g} s): {p.reason}")
            said, said_at = p.reason, now
        time.sleep(min(0.5, max(0.0, end - now)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simclr health",
        description="Ask a simclr serve whether it is SERVING (exit 0) or not (exit 1, why).",
    )
    p.add_argument("--target", required=True, help="HOST:PORT of the gRPC server")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system root CAs)")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM root CA to trust (implies --tls)")
    p.add_argument("--token", default=None, help=f"bearer token, checked too [env {TOKEN_ENV}]")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer [5]")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    target = check_target(args.target)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    tls = args.tls_ca if args.tls_ca is not None else args.tls
    p = probe(target, tls=tls, token=token, timeout=args.timeout)
    if p.serving:
        print(f"{args.target}: SERVING (model {p.model_version})")
        return 0
    print(f"{args.target}: {p.reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(run_main(main))
