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
from server.runtime import ModelInfo, select_output

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
    ) -> None:
        self._metrics = metrics
        self._decode_pool = decode_pool
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

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        self.last_call = asyncio.get_running_loop().time()
        if not self._accepting:  # starting up or draining: not counted as in flight
            self._metrics.request_done(
                "DEADLINE_EXCEEDED" if _caller_gone(context) else "UNAVAILABLE", 0
            )
            await _abort(context, grpc.StatusCode.UNAVAILABLE, self._refusal)
        self._inflight += 1
        self._idle.clear()
        try:
            return await self._answer(request, context)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _answer(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        try:
            response = await self._embed(request, context)
        except RpcFailure as exc:
            if _caller_gone(context):  # nobody is listening for the answer any more
                self._metrics.request_done(_gone_code(context), 0)
                log.debug("Embed n=%d: caller gone before its %s", len(request.images), exc.code)
                raise asyncio.CancelledError from None
            self._metrics.request_done(exc.code.name, 0)
            log.debug("Embed n=%d -> %s: %s", len(request.images), exc.code.name, exc.details)
            await _abort(context, exc.code, exc.details)
        except asyncio.CancelledError:  # client gone or deadline hit: grpc cancels this task
            self._metrics.request_done(_gone_code(context), 0)
            raise
        except Exception as exc:
            self._metrics.request_done("INTERNAL", 0)
            log.exception("Embed failed")
            await _abort(
                context, grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
            )
        self._metrics.request_done("OK", len(request.images) - len(response.errors))
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
        t1 = time.perf_counter()
        name, kind = _OUTPUT_FOR_KIND[request.kind]
        if len(images):
            remaining = context.time_remaining()
            loop = asyncio.get_running_loop()
            deadline = None if remaining is None else loop.time() + remaining
            try:
                outputs = await backend.batcher.submit(images, deadline=deadline)
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
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "Embed peer=%s n=%d bad=%d kind=%d decode_ms=%.1f queue+model_ms=%.1f",
                context.peer(),
                n,
                len(bad),
                request.kind,
                1e3 * (t1 - t0),
                1e3 * (time.perf_counter() - t1),
            )
        rows = iter(vectors.tolist())
        embeddings = [
            pb.Embedding() if i in bad else pb.Embedding(values=next(rows)) for i in range(n)
        ]
        return pb.EmbedResponse(
            embeddings=embeddings,
            kind=kind,
            dimension=vectors.shape[1],
            model_version=backend.info.model_version,
            errors=[pb.ImageError(index=i, reason=reason) for i, reason in sorted(bad.items())],
        )

    async def _decode(
        self, request: pb.EmbedRequest, pre: Preprocessor
    ) -> tuple[np.ndarray, dict[int, str]]:
        """The request's images → (``[m, S, S, 3]`` usable ones in order, ``{index: reason}``).

        Without ``per_image_errors`` the first bad image (by index) fails the whole request.
        """
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(self._decode_pool, self._decode_one, image, pre)
            for image in request.images
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
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


def _caller_gone(context: grpc.aio.ServicerContext) -> bool:
    """The call's deadline has passed (grpc cancels it; an answer could no longer be sent)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _gone_code(context: grpc.aio.ServicerContext) -> str:
    """What the caller saw when it went away: its own deadline, or a cancel."""
    return "DEADLINE_EXCEEDED" if _caller_gone(context) else "CANCELLED"


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """``context.abort``, quiet when the call ended under us (client cancelled or timed out).

    Sending the status of a call the client has just abandoned fails inside grpc with an
    ``ExecuteBatchError`` that grpc logs at ERROR with a traceback; for a normal event (a client
    giving up) the answer is simply dropped, like a cancel.
    """
    try:
        await context.abort(code, details)
    except grpc.aio.AbortError:
        raise  # the normal way abort ends the handler
    except Exception as exc:
        log.debug("could not send %s (caller gone): %s", code.name, exc)
        raise asyncio.CancelledError from None
