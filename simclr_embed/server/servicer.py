"""``simclr.v1.EmbeddingService``: a thin adapter of the request path (``server.core``) to gRPC.

Per call: admission (UNAVAILABLE while starting or draining), the request's images and options
handed to :meth:`RequestPath.embed`, its :class:`Answer` laid out as an ``EmbedResponse`` (packed
or ``repeated float``), its typed errors mapped to status codes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
import numpy as np

from simclr_embed import tracing
from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from simclr_embed.server.core import (
    STATUS,
    EmbedOptions,
    ImageInput,
    RequestError,
    RequestPath,
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


def rpc_failure(exc: RequestError, prefix: str = "") -> RpcFailure:
    """A typed request error → the gRPC status it is answered with."""
    return RpcFailure(getattr(grpc.StatusCode, STATUS[exc.status]), prefix + exc.message)


def images_of(request: pb.EmbedRequest) -> list[ImageInput]:
    """The request's images as the core takes them: file bytes, or the RawImage as it is."""
    out: list[ImageInput] = []
    for image in request.images:
        source = image.WhichOneof("source")
        out.append(image.encoded if source == "encoded" else image.raw if source else None)
    return out


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    """Answers UNAVAILABLE until the path is attached and after it drains.

    Draining is done in the application rather than by ``grpc.aio.Server.stop(grace)`` alone:
    gRPC's stop answers CANCELLED to calls that have arrived but not yet reached a handler
    (grpc/grpc#41785), and CANCELLED is never retried. While draining, every new call reaches
    this handler and is answered UNAVAILABLE (retryable).
    """

    def __init__(self, path: RequestPath, metrics: Metrics) -> None:
        self.path = path
        self._metrics = metrics

    @property
    def accepting(self) -> bool:
        return self.path.accepting

    async def wait_draining(self) -> None:
        await self.path.wait_draining()

    def _enter(self, context: grpc.aio.ServicerContext) -> bool:
        """Count a new call in flight; False (after counting the refusal) while not accepting."""
        if self.path.enter():
            return True
        code = "DEADLINE_EXCEEDED" if caller_gone(context) else "UNAVAILABLE"
        self._metrics.request_done(code, 0)
        return False

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        if tracing.enabled():  # the caller's traceparent, for the request path's span
            tracing.INCOMING.set(
                (f"{SERVICE_NAME}/Embed", dict(context.invocation_metadata() or ()))
            )
        if not self._enter(context):
            await abort(context, grpc.StatusCode.UNAVAILABLE, self.path.refusal)
        try:
            response = await self._answer(request, context)
        finally:
            self.path.leave()
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
        """See ``server.streaming``: the messages of one stream through the same path as Embed."""
        if tracing.enabled():  # one span per message, all under the stream's traceparent
            tracing.INCOMING.set(
                (f"{SERVICE_NAME}/EmbedStream", dict(context.invocation_metadata() or ()))
            )
        if not self._enter(context):
            await abort(context, grpc.StatusCode.UNAVAILABLE, self.path.refusal)
        try:
            async for response in stream_responses(self, request_iterator, context):
                yield response
        except asyncio.CancelledError:  # the client cancelled the stream or its deadline hit
            self._metrics.request_done(gone_code(context), 0)
            raise
        finally:
            self.path.leave()

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
        backend = self.path.backend
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
        if request.kind not in _OUTPUT_FOR_KIND:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown embedding kind {request.kind} (expected FEATURES=1 or PROJECTION=2)",
            )
        name, kind = _OUTPUT_FOR_KIND[request.kind]
        remaining = context.time_remaining()
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        opts = EmbedOptions(
            output=name,
            normalize=request.l2_normalize,
            per_image_errors=request.per_image_errors,
            deadline=deadline,
            wait_for_room=wait_for_room,
        )
        try:
            answer = await self.path.embed(images_of(request), opts)
        except RequestError as exc:
            raise rpc_failure(exc) from None
        timings = pb.StageTimings(
            decode_ms=answer.decode_ms, queue_ms=answer.queue_ms, inference_ms=answer.inference_ms
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "Embed peer=%s n=%d bad=%d kind=%d decode_ms=%.1f queue_ms=%.1f model_ms=%.1f",
                context.peer(), answer.n, len(answer.bad), request.kind,
                timings.decode_ms, timings.queue_ms, timings.inference_ms,
            )  # fmt: skip
        bad, vectors, n = answer.bad, answer.vectors, answer.n
        response = pb.EmbedResponse(
            kind=kind,
            dimension=vectors.shape[1],
            model_version=answer.model_version,
            errors=[pb.ImageError(index=i, reason=reason) for i, reason in sorted(bad.items())],
            timings=timings,
        )
        if request.packed:  # [n, D] little-endian float32, zeros for the bad images
            response.packed_embeddings = np.asarray(answer.matrix(), "<f4").tobytes()
        else:  # repeated Embedding, laid out as wire bytes (server.wire: ~40x cheaper)
            response.MergeFromString(embeddings_wire(vectors, n, bad))
        return response
