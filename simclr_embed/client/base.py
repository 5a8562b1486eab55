"""What the blocking and the asyncio client share: the channels, stubs and retry rules."""

from __future__ import annotations

import random
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from simclr_embed import tracing
from simclr_embed.client.channel import (
    channel_options,
    credentials,
    grpc_target,
    make_channel,
    probe_options,
)
from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc

INFO_REQUEST = pb.GetModelInfoRequest()
RESENDABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)
PROBE_S = 5.0  # health probes fail fast: they answer "is anyone there?"


def backoff_s(attempt: int, base: float = 1.0, cap: float = 30.0) -> float:
    """Full jitter: random(0, min(cap, base·2^attempt)) — retrying clients spread out."""
    return random.uniform(0, min(cap, base * 2**attempt))


class ClientBase:
    _aio = False  # grpc.aio channels (AsyncEmbeddingClient) or blocking ones

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        tls: Any = False,
        timeout: float | None = 60.0,
        max_batch: int = 64,
        max_message_mb: int = 64,
        retry: bool = True,
        resend: int = 0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if resend < 0:
            raise ValueError("resend must be >= 0")
        self.target = grpc_target(target)
        self.timeout, self.max_batch, self.resend = timeout, max_batch, resend
        self._max_bytes = int(max_message_mb * 2**20 * 0.9)  # headroom for the message framing
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        creds = credentials(tls)
        options = channel_options(max_message_mb, retry=retry)
        self._channel = make_channel(self.target, creds, options, aio=self._aio)
        # Health probes on a plain channel of their own (see simclr_embed.client.channel.probe_options).
        self._probe = make_channel(self.target, creds, probe_options(max_message_mb), aio=self._aio)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._probe)
        self._dims: dict[str, int] = {}


def traced(metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """``metadata`` plus the caller's current trace context (``traceparent``), when there is one
    (``simclr embed --otlp-endpoint``, or the application's own OpenTelemetry): the server's
    spans then join the caller's trace. Read in the calling thread: worker threads do not
    inherit the caller's context."""
    carrier: dict[str, str] = {}
    tracing.inject_current(carrier)
    return metadata + tuple(carrier.items()) if carrier else metadata
