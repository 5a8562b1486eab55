"""``simclr.v1.EmbeddingService``: proto ↔ numpy and status codes; the model is the batcher's.

Per request: check it, decode every image in the decode thread pool (a bad image fails only this
request, before anything is batched), hand the ``[n, S, S, 3]`` array to the batcher with the
request's deadline, pick ``features`` or ``projection``, optionally L2-normalize, answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from server.batcher import (
    BatcherStoppedError,
    DeadlineExceededError,
    DynamicBatcher,
    QueueFullError,
)
from server.images import ImageError, Preprocessor
from server.metrics import Metrics
from server.pb.simclr.v1 import embedding_pb2 as pb
from server.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from server.runtime import ModelInfo

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
_OUTPUT_FOR_KIND = {
    pb.EMBEDDING_KIND_UNSPECIFIED: ("features", pb.EMBEDDING_KIND_FEATURES),
    pb.EMBEDDING_KIND_FEATURES: ("features", pb.EMBEDDING_KIND_FEATURES),
    pb.EMBEDDING_KIND_PROJECTION: ("projection", pb.EMBEDDING_KIND_PROJECTION),
}


class RpcFailure(Exception):
    """Ends the current RPC with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


@dataclass(frozen=True)
class Backend:
    """Everything that exists only once the model is loaded and warm."""

    info: ModelInfo
    providers: tuple[str, ...]
    preprocessor: Preprocessor
    batcher: DynamicBatcher


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    """Answers UNAVAILABLE until :meth:`attach` and after :meth:`drain`."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        decode_pool: concurrent.futures.Executor,
        max_request_images: int,
    ) -> None:
        self._metrics = metrics
        self._decode_pool = decode_pool
        self._max_request_images = max_request_images
        self._backend: Backend | None = None
        self._accepting = False

    def attach(self, backend: Backend) -> None:
        self._backend = backend
        self._accepting = True

    def drain(self) -> None:
        self._accepting = False

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        try:
            response = await self._embed(request, context)
        except RpcFailure as exc:
            self._metrics.request_done(exc.code.name, 0)
            log.debug("Embed n=%d -> %s: %s", len(request.images), exc.code.name, exc.details)
            await context.abort(exc.code, exc.details)
        except asyncio.CancelledError:  # client gone or deadline hit: grpc cancels this task
            self._metrics.request_done("CANCELLED", 0)
            raise
        except Exception as exc:
            self._metrics.request_done("INTERNAL", 0)
            log.exception("Embed failed")
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
            )
        self._metrics.request_done("OK", len(request.images))
        return response

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        backend = self._backend
        if backend is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is still loading")
        info = backend.info
        return pb.GetModelInfoResponse(
            model_version=info.model_version,
            arch=info.arch,
            image_size=info.image_size,
            feature_dimension=info.feature_dim,
            projection_dimension=info.projection_dim,
            max_batch_size=backend.batcher.max_batch_size,
            providers=list(backend.providers),
        )

    async def _embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        backend = self._backend
        if backend is None or not self._accepting:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "server is starting up or draining")
        if request.kind not in _OUTPUT_FOR_KIND:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown embedding kind {request.kind} (expected FEATURES=1 or PROJECTION=2)",
            )
        n = len(request.images)
        if n == 0:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "request has no images")
        limit = min(self._max_request_images, backend.batcher.max_queue)
        if n > limit:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request has {n} images, at most {limit} per request "
                f"(--max-request-images/--max-queue); send several requests",
            )
        if not backend.batcher.has_room(n):  # overloaded: refuse before spending decode time
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queue full: {backend.batcher.queued_images} of {backend.batcher.max_queue} "
                f"images waiting, {n} more do not fit; retry later",
            )
        t0 = time.perf_counter()
        images = await self._decode(request.images, backend.preprocessor)  # [n, S, S, 3]
        t1 = time.perf_counter()
        remaining = context.time_remaining()
        loop = asyncio.get_running_loop()
        deadline = None if remaining is None else loop.time() + remaining
        try:
            outputs = await backend.batcher.submit(images, deadline=deadline)
        except QueueFullError as exc:
            raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later") from None
        except DeadlineExceededError as exc:
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
        except BatcherStoppedError as exc:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "Embed peer=%s n=%d kind=%d decode_ms=%.1f queue+model_ms=%.1f",
                context.peer(),
                n,
                request.kind,
                1e3 * (t1 - t0),
                1e3 * (time.perf_counter() - t1),
            )
        name, kind = _OUTPUT_FOR_KIND[request.kind]
        vectors = outputs[name]  # [n, D] float32
        if request.l2_normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # [n, 1]
            vectors = vectors / np.maximum(norms, 1e-12)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=row) for row in vectors.tolist()],
            kind=kind,
            dimension=vectors.shape[1],
            model_version=backend.info.model_version,
        )

    async def _decode(self, images: Sequence[pb.Image], pre: Preprocessor) -> np.ndarray:
        """All images of a request → ``[n, S, S, 3]``; the first bad one (by index) fails it."""
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(self._decode_pool, self._decode_one, image, pre)
            for image in images
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for index, result in enumerate(results):
            if isinstance(result, ImageError):
                raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"image {index}: {result}")
            if isinstance(result, BaseException):
                raise result
        return np.stack(results)  # type: ignore[arg-type]

    def _decode_one(self, image: pb.Image, pre: Preprocessor) -> np.ndarray:
        """Runs in a decode thread."""
        started = time.perf_counter()
        try:
            source = image.WhichOneof("source")
            if source == "encoded":
                return pre.from_encoded(image.encoded)
            if source == "raw":
                raw = image.raw
                return pre.from_raw(raw.pixels, raw.height, raw.width, raw.channels)
            raise ImageError("neither encoded bytes nor raw pixels are set")
        finally:  # refused images cost decode time too
            self._metrics.decode_seconds.observe(time.perf_counter() - started)
