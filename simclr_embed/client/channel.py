"""The client's channel: target syntax, credentials, and gRPC's own balancing, health checking,
wait-for-ready and retry policy, all through the service config (no hand-written retry loop).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path
from typing import Any

import grpc

from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name

# gRPC caps maxAttempts at 5. Backoff n waits random(0, min(initial·mult^(n-1), max)) seconds.
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
}


def service_config(*, retry: bool = True, health_check: bool = True) -> dict[str, Any]:
    """The channel's service config.

    - ``round_robin`` over every resolved address (a ``dns:///`` name of a headless Service,
      or ``ipv4:a:p,b:p``), each server's health watched through ``grpc.health.v1`` (A17):
      a draining server is left the moment it says NOT_SERVING, before its port closes;
    - ``waitForReady``: while no server is SERVING (a restart, a rollout) a call waits, up to
      its deadline, instead of failing at once;
    - ``retryPolicy`` (:data:`RETRY_POLICY`): UNAVAILABLE and RESOURCE_EXHAUSTED answers are
      retried with exponential backoff and jitter — both are safe for ``Embed``, a pure
      function of its request.
    """
    method: dict[str, Any] = {"name": [{"service": SERVICE}], "waitForReady": True}
    if retry:
        method["retryPolicy"] = RETRY_POLICY
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [method],
    }
    if health_check:
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    return config


def grpc_target(spec: str) -> str:
    """``HOST:PORT``, a comma-separated list of them, or any gRPC target (``dns:///name:port``,
    ``ipv4:...``, ``unix:...``) → one gRPC target.

    A list becomes an ``ipv4:``/``ipv6:`` address list (host names resolved once, here) that
    the channel balances round-robin; a ``dns:///`` name is re-resolved by gRPC itself and is
    the better choice when replicas come and go (a Kubernetes headless Service).
    """
    spec = spec.strip()
    if "," not in spec:
        return spec
    v4: list[str] = []
    v6: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"--target {item!r}: expected HOST:PORT")
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
            addresses = [ip]
        except ValueError:  # a host name: every address it has now
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise ValueError(f"--target {item!r}: cannot resolve {host}: {exc}") from None
            addresses = sorted({ipaddress.ip_address(i[4][0]) for i in infos}, key=str)
        for ip in addresses:
            (v4 if ip.version == 4 else v6).append(
                f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"
            )
    if v4:  # one family per target; IPv4 when there is any
        return "ipv4:" + ",".join(dict.fromkeys(v4))
    return "ipv6:" + ",".join(dict.fromkeys(v6))


def credentials(tls: bool | str | os.PathLike | bytes | None) -> grpc.ChannelCredentials | None:
    """``False``: plaintext; ``True``: TLS with system roots; a path or PEM bytes: that root CA."""
    if tls is False or tls is None:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    pem = tls if isinstance(tls, bytes) else Path(tls).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=pem)


def channel_options(max_message_mb: int, *, retry: bool) -> list[tuple[str, Any]]:
    """Message limits + the service config; health probes use :func:`probe_options` instead."""
    return [
        *probe_options(max_message_mb),
        ("grpc.service_config", json.dumps(service_config(retry=retry))),
        ("grpc.enable_retries", int(retry)),
        # A call is retried only while its request is still buffered (default 256 KiB).
        ("grpc.per_rpc_retry_buffer_size", max_message_mb * 2**20),
    ]


def probe_options(max_message_mb: int) -> list[tuple[str, Any]]:
    """A plain channel: on the balanced one a NOT_SERVING server is not routed to at all, so its
    health could not be asked."""
    return [
        ("grpc.max_send_message_length", max_message_mb * 2**20),
        ("grpc.max_receive_message_length", max_message_mb * 2**20),
    ]


def make_channel(
    target: str, creds: grpc.ChannelCredentials | None, options: list[tuple[str, Any]], aio: bool
) -> Any:
    mod = grpc.aio if aio else grpc
    if creds is None:
        return mod.insecure_channel(target, options=options)
    return mod.secure_channel(target, creds, options=options)
