"""Bearer-token check for every RPC except health (load balancers probe without credentials)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

# Probes come without credentials: gRPC health, and the Open Inference Protocol's liveness and
# readiness calls.
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
)
REASON = "missing or invalid token: send metadata 'authorization: Bearer <token>'"


async def _deny(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REASON)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Answer UNAUTHENTICATED unless ``authorization: Bearer <token>`` matches.

    Args:
        token: the shared secret.
        on_reject: called with the method name of each refused call (metrics).
    """

    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                # Constant time: the comparison must not leak how much of a guess was right.
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        if self._on_reject is not None:
            self._on_reject(method)
        # Same call shape as the real handler (unary or streaming, e.g. reflection), other body.
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_deny, **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_deny, **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_deny, **kwargs)
        return grpc.stream_stream_rpc_method_handler(_deny, **kwargs)
