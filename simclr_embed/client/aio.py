"""``AsyncEmbeddingClient``: the asyncio twin of ``simclr_embed.client.blocking.EmbeddingClient`` (grpc.aio)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from simclr_embed.client.base import (
    INFO_REQUEST,
    PROBE_S,
    RESENDABLE,
    ClientBase,
    backoff_s,
    traced,
)
from simclr_embed.client.channel import SERVICE
from simclr_embed.client.codec import (
    Chunk,
    EmbedBatch,
    EmbeddingError,
    EmbedResult,
    ImageLike,
    build_request,
    check_options,
    info_dict,
    not_serving,
    plan_chunks,
    rpc_error,
    to_batch,
    unreachable,
)


class AsyncEmbeddingClient(ClientBase):
    """asyncio client on ``grpc.aio``; create and use it inside one running event loop.
    The same arguments as :class:`EmbeddingClient`."""

    _aio = True

    async def embed(
        self,
        images: Sequence[ImageLike] | Iterable[ImageLike],
        kind: str = "features",
        normalize: bool = False,
        *,
        concurrency: int = 1,
        on_error: str = "raise",
    ) -> Any:
        """Embed ``images``, up to ``concurrency`` requests at a time; as ``EmbeddingClient``."""
        check_options(kind, on_error)
        skip = on_error == "skip"
        slots = asyncio.Semaphore(max(1, concurrency))
        tasks: list[asyncio.Task[EmbedBatch]] = []

        async def call(chunk: Chunk) -> EmbedBatch:
            try:
                if not chunk.images:
                    return to_batch(chunk, None, await self._dim(kind))
                request = build_request(chunk.images, kind, normalize, skip)
                return to_batch(chunk, await self._call(request, chunk.start), 0)
            finally:
                slots.release()

        try:
            for chunk in plan_chunks(images, self.max_batch, self._max_bytes, skip=skip):
                await slots.acquire()  # bound how many chunks sit in memory
                tasks.append(asyncio.ensure_future(call(chunk)))
            batches = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        vectors = [b.vectors for b in batches] or [np.zeros((0, await self._dim(kind)), np.float32)]
        if not skip:
            return np.concatenate(vectors)
        indices = [b.indices for b in batches] or [np.zeros(0, np.int64)]
        return EmbedResult(
            np.concatenate(vectors),
            np.concatenate(indices),
            [f for b in batches for f in b.failures],
        )

    async def _call(self, request: Any, start: int) -> Any:
        for attempt in range(self.resend + 1):
            try:
                return await self._stub.Embed(
                    request, timeout=self.timeout, metadata=traced(self._metadata)
                )
            except grpc.RpcError as exc:
                if exc.code() not in RESENDABLE or attempt == self.resend:
                    raise await self._explained(exc, start) from None
            await asyncio.sleep(backoff_s(attempt))
        raise AssertionError("unreachable")

    async def _explained(self, exc: grpc.RpcError, start: int) -> EmbeddingError:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            return rpc_error(exc, start)
        try:
            status = await self.health()
        except grpc.RpcError as probe:
            return unreachable(self.target, self.timeout, probe) or rpc_error(exc, start)
        return not_serving(self.target, self.timeout, status) or rpc_error(exc, start)

    async def _dim(self, kind: str) -> int:
        info = await self.model_info()
        return info["projection_dimension" if kind == "projection" else "feature_dimension"]

    async def health(self, service: str = SERVICE) -> str:
        """``"SERVING"``, ``"NOT_SERVING"``, ... (health needs no token; fails fast)."""
        r = await self._health.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=min(self.timeout or PROBE_S, PROBE_S),
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    async def model_info(self) -> dict[str, Any]:
        try:
            r = await self._stub.GetModelInfo(
                INFO_REQUEST, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise await self._explained(exc, 0) from None
        return info_dict(r)

    async def close(self) -> None:
        await self._channel.close()
        await self._probe.close()

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
