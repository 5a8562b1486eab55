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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NoReturn

import grpc
import numpy as np

from simclr_embed.inference.images import ImageError, Preprocessor
from simclr_embed.inference.runtime import ModelInfo, select_output
from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from simclr_embed.server.batcher import (
    BatcherStoppedError,
    DeadlineExceededError,
    DynamicBatcher,
    QueueFullError,
)
from simclr_embed.server.metrics import Metrics
from simclr_embed.server.rpc import RpcFailure, abort, caller_gone, gone_code
from simclr_embed.server.streaming import stream_responses
from simclr_embed.server.wire import embeddings_wire

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
_OUTPUT_FOR_KIND = {
    pb.EMBEDDING_KIND_UNSPECIFIED: ("features", pb.EMBEDDING_KIND_FEATURES),
    pb.EMBEDDING_KIND_FEATURES: ("features", pb.EMBEDDING_KIND_FEATURES),
    pb.EMBEDDING_KIND_PROJECTION: ("projection", pb.EMBEDDING_KIND_PROJECTION),
}


@dataclass(frozen=True)
class Backend:
    """Everything that exists only once the model is loaded and warm."""

    info: ModelInfo
    providers: tuple[str, ...]
    preprocessor: Preprocessor
    batcher: DynamicBatcher


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    """Answers UNAVAILABLE until :meth:`attach` and after :meth:`drain`.

    Draining is done here, in the application, rather than by ``grpc.aio.Server.stop(grace)``
    alone: gRPC's stop answers CANCELLED to calls that have arrived but not yet reached a handler
    (grpc/grpc#41785), and CANCELLED is never retried. While draining, every new call reaches
    this handler and is answered UNAVAILABLE (retryable); :meth:`wait_idle` tells the server when
    the calls accepted before the drain have all been answered.
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        decode_pool: concurrent.futures.Executor,
        max_request_images: int,
        decode_workers: int = 1,
    ) -> None:
        self._metrics = metrics
        self._decode_pool = decode_pool
        self._decode_workers = max(1, decode_workers)  # the pool's threads
        self._max_request_images = max_request_images
        self._backend: Backend | None = None
        self._accepting = False
        self._refusal = "server is starting up (model loading)"
        self._inflight = 0  # Embed calls accepted and not yet answered
        self.last_call = 0.0  # loop.time() of the latest Embed call to arrive
        self._idle = asyncio.Event()
        self._idle.set()

    def attach(self, backend: Backend) -> None:
        self._backend = backend
        self._accepting = True

    def drain(self) -> None:
        """Refuse every new call (UNAVAILABLE) from now on; accepted ones run to the end."""
        self._accepting = False
        self._refusal = "server is draining (shutting down); retry, another replica will answer"

    @property
    def inflight(self) -> int:
        return self._inflight

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no accepted call is left (True) or ``timeout`` seconds pass (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _enter(self, context: grpc.aio.ServicerContext) -> bool:
        """Count a new call in flight; False (after counting the refusal) while not accepting."""
        self.last_call = asyncio.get_running_loop().time()
        if not self._accepting:  # starting up or draining: not counted as in flight
            self._metrics.request_done(
                "DEADLINE_EXCEEDED" if caller_gone(context) else "UNAVAILABLE", 0
            )
            return False
        self._inflight += 1
        self._idle.clear()
        return True

    def _leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        if not self._enter(context):
            await abort(context, grpc.StatusCode.UNAVAILABLE, self._refusal)
        try:
            response = await self._answer(request, context)
        finally:
            self._leave()
        t = response.timings
        context.set_trailing_metadata(
            (
                ("simclr-decode-ms", f"{t.decode_ms:.3f}"),
                ("simclr-queue-ms", f"{t.queue_ms:.3f}"),
                ("simclr-inference-ms", f"{t.inference_ms:.3f}"),
            )
        )
        return response

    async def EmbedStream(
        self, request_iterator: AsyncIterator[pb.EmbedRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbedResponse]:
        """See ``simclr_embed.server.streaming``: the messages of one stream through the same path as Embed."""
        if not self._enter(context):
            await abort(context, grpc.StatusCode.UNAVAILABLE, self._refusal)
        try:
            async for response in stream_responses(self, request_iterator, context):
                yield response
        except asyncio.CancelledError:  # the client cancelled the stream or its deadline hit
            self._metrics.request_done(gone_code(context), 0)
            raise
        finally:
            self._leave()

    async def _answer(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        """One request, counted in the metrics; failures end the call (abort)."""
        try:
            response = await self.embed(request, context)
        except RpcFailure as exc:
            await self.fail(exc, context, len(request.images))
        except asyncio.CancelledError:  # client gone or deadline hit: grpc cancels this task
            self._metrics.request_done(gone_code(context), 0)
            raise
        except Exception as exc:
            self._metrics.request_done("INTERNAL", 0)
            log.exception("Embed failed")
            await abort(
                context, grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
            )
        self.count_ok(request, response)
        return response

    def count_ok(self, request: pb.EmbedRequest, response: pb.EmbedResponse) -> None:
        self._metrics.request_done("OK", len(request.images) - len(response.errors))

    async def fail(
        self, exc: RpcFailure, context: grpc.aio.ServicerContext, n: int, prefix: str = ""
    ) -> NoReturn:
        """End the call with ``exc`` (counted as the caller sees it)."""
        if caller_gone(context):  # nobody is listening for the answer any more
            self._metrics.request_done(gone_code(context), 0)
            log.debug("Embed n=%d: caller gone before its %s", n, exc.code)
            raise asyncio.CancelledError from None
        self._metrics.request_done(exc.code.name, 0)
        log.debug("Embed n=%d -> %s: %s%s", n, exc.code.name, prefix, exc.details)
        await abort(context, exc.code, prefix + exc.details)
        raise AssertionError("abort returned")  # pragma: no cover

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

    async def embed(
        self,
        request: pb.EmbedRequest,
        context: grpc.aio.ServicerContext,
        *,
        wait_for_room: bool = False,
    ) -> pb.EmbedResponse:
        """One request → its response (raises :class:`RpcFailure`). ``wait_for_room``: wait
        for queue space instead of answering RESOURCE_EXHAUSTED (a stream bounds itself)."""
        backend = self._backend
        assert backend is not None  # accepting implies attached
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
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = None if remaining is None else loop.time() + remaining
        if wait_for_room and not await backend.batcher.wait_for_room(n, deadline):
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed waiting for room")
        if not backend.batcher.has_room(n):  # overloaded: refuse before spending decode time
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queue full: {backend.batcher.queued_images} of {backend.batcher.max_queue} "
                f"images waiting, {n} more do not fit; retry later",
            )
        t0 = time.perf_counter()
        # [m, S, S, 3] of the m usable images, and {index: reason} of the others (only with
        # per_image_errors; otherwise the first bad image has already failed the request).
        images, bad = await self._decode(request, backend.preprocessor)
        decode_ms = 1e3 * (time.perf_counter() - t0)
        name, kind = _OUTPUT_FOR_KIND[request.kind]
        timing: dict[str, float] = {}
        if len(images):
            try:
                outputs = await backend.batcher.submit(images, deadline=deadline, timing=timing)
            except QueueFullError as exc:
                raise RpcFailure(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later"
                ) from None
            except DeadlineExceededError as exc:
                raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
            except BatcherStoppedError as exc:
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
            vectors = select_output(outputs, name, request.l2_normalize)  # [m, D]
        else:  # every image was bad: nothing to run
            dim = backend.info.feature_dim if name == "features" else backend.info.projection_dim
            vectors = np.zeros((0, dim), np.float32)
        timings = pb.StageTimings(
            decode_ms=decode_ms,
            queue_ms=1e3 * timing.get("queue_s", 0.0),
            inference_ms=1e3 * timing.get("inference_s", 0.0),
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "Embed peer=%s n=%d bad=%d kind=%d decode_ms=%.1f queue_ms=%.1f model_ms=%.1f",
                context.peer(), n, len(bad), request.kind,
                timings.decode_ms, timings.queue_ms, timings.inference_ms,
            )  # fmt: skip
        response = pb.EmbedResponse(
            kind=kind,
            dimension=vectors.shape[1],
            model_version=backend.info.model_version,
            errors=[pb.ImageError(index=i, reason=reason) for i, reason in sorted(bad.items())],
            timings=timings,
        )
        if request.packed and not bad:  # [n, D] little-endian float32
            response.packed_embeddings = vectors.astype("<f4", copy=False).tobytes()
        elif request.packed:  # zeros for the bad images
            matrix = np.zeros((n, vectors.shape[1]), "<f4")
            good = [i for i in range(n) if i not in bad]
            matrix[good] = vectors
            response.packed_embeddings = matrix.tobytes()
        else:  # repeated Embedding, laid out as wire bytes (simclr_embed.server.wire: ~40x cheaper)
            response.MergeFromString(embeddings_wire(vectors, n, bad))
        return response

    async def _decode(
        self, request: pb.EmbedRequest, pre: Preprocessor
    ) -> tuple[np.ndarray, dict[int, str]]:
        """The request's images → (``[m, S, S, 3]`` usable ones in order, ``{index: reason}``).

        Without ``per_image_errors`` the first bad image (by index) fails the whole request.
        """
        images = request.images
        if all(image.HasField("raw") for image in images):  # the bulk case: no decode at all
            started = time.perf_counter()
            batch = pre.raw_batch([image.raw for image in images])
            if batch is not None:
                share = (time.perf_counter() - started) / len(images)
                for _ in images:  # simclr_decode_seconds counts images, whatever their path
                    self._metrics.decode_seconds.observe(share)
                return batch, {}
        loop = asyncio.get_running_loop()
        results: list[object] = [None] * len(images)
        pending: list[int] = []
        for i, image in enumerate(images):
            raw = image.raw if image.WhichOneof("source") == "raw" else None
            if raw is not None and pre.is_direct(raw.height, raw.width):
                started = time.perf_counter()
                try:  # a copy of the pixels: not worth a thread hop
                    results[i] = pre.from_raw(raw.pixels, raw.height, raw.width, raw.channels)
                except ImageError as exc:
                    results[i] = exc
                self._metrics.decode_seconds.observe(time.perf_counter() - started)
            else:
                pending.append(i)
        if pending:
            # One job per decode thread, not per image: a hop to a thread and back costs about
            # as much CPU as decoding a small JPEG (bench/serve_overhead.py).
            k = min(len(pending), self._decode_workers)
            chunks = [pending[j::k] for j in range(k)]
            jobs = [
                loop.run_in_executor(
                    self._decode_pool, self._decode_many, [images[i] for i in chunk], pre
                )
                for chunk in chunks
            ]
            for chunk, decoded in zip(chunks, await asyncio.gather(*jobs), strict=True):
                for i, result in zip(chunk, decoded, strict=True):
                    results[i] = result
        good: list[np.ndarray] = []
        bad: dict[int, str] = {}
        for index, result in enumerate(results):
            if isinstance(result, ImageError):
                if not request.per_image_errors:
                    raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"image {index}: {result}")
                bad[index] = str(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                good.append(result)
        size = pre.size
        stacked = np.stack(good) if good else np.zeros((0, size, size, 3), np.uint8)
        return stacked, bad

    def _decode_many(self, images: list[pb.Image], pre: Preprocessor) -> list[object]:
        """Runs in a decode thread: each image's array, or its :class:`ImageError` (or another
        exception, re-raised on the loop)."""
        out: list[object] = []
        for image in images:
            try:
                out.append(self._decode_one(image, pre))
            except Exception as exc:
                out.append(exc)
        return out

    def _decode_one(self, image: pb.Image, pre: Preprocessor) -> np.ndarray:
        """One image; in a decode thread."""
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
