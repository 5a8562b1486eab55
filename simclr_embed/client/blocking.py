"""``EmbeddingClient``, the blocking Python client of the embedding service (CONTRACT §5).

    with EmbeddingClient("127.0.0.1:50051", token=None) as client:
        vectors = client.embed(["a.jpg", "b.png"], kind="features", normalize=True)  # [2, D]
        result = client.embed(paths, on_error="skip")    # .vectors, .indices, .failures
        for batch in client.embed_iter(paths):            # in order, as answers arrive
            index.add(batch.vectors)

Images may be paths, encoded file bytes, PIL images or uint8 HWC arrays (gray, RGB or RGBA).
Large lists are sent as several requests of at most ``max_batch`` images (and well under the
message limit), ``concurrency`` at a time, and come back in order; memory holds at most
``concurrency`` requests, so ``embed_iter`` over millions of paths stays flat.

Rolling restarts cost latency, not errors (``simclr_embed.client.channel.service_config``): round-robin over
every address of the target, health watched per server, wait-for-ready, gRPC's retry policy.
``resend=K`` additionally re-sends a request up to K times (exponential backoff, full jitter)
when the channel's policy gave up on UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED —
for outages longer than its 5 attempts, as in a bulk job.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
from simclr_embed.client.channel import (
    SERVICE,
)
from simclr_embed.client.codec import (
    KINDS,
    Chunk,
    EmbedBatch,
    EmbeddingError,
    EmbedResult,
    Failure,
    ImageLike,
    build_request,
    check_options,
    info_dict,
    not_serving,
    plan_chunks,
    rpc_error,
    to_batch,
    to_proto_image,
    unreachable,
)
from simclr_embed.client.stream import StreamUnsupported, stream_batches

__all__ = [
    "KINDS",
    "SERVICE",
    "EmbedBatch",
    "EmbedResult",
    "EmbeddingClient",
    "EmbeddingError",
    "Failure",
    "to_proto_image",
]

Progress = Callable[[int], None]  # called with the number of images just embedded


class EmbeddingClient(ClientBase):
    """Blocking client; thread-safe (one channel, any number of threads).

    Args:
        target: ``HOST:PORT``, several comma-separated, ``dns:///name:port`` (every address,
            round-robin, re-resolved) or any gRPC target.
        token: bearer token for a server started with ``--auth-token``.
        tls: ``False``, ``True`` (system roots) or a root CA (path or PEM bytes).
        timeout: seconds per call, waiting for a SERVING server and retries included.
        max_batch: most images per request.
        retry: gRPC's retry policy (``simclr_embed.client.channel.RETRY_POLICY``); ``False``: one attempt.
        resend: re-sends of a whole request after the policy gave up (see the module docstring).
    """

    def embed(
        self,
        images: Sequence[ImageLike] | Iterable[ImageLike],
        kind: str = "features",
        normalize: bool = False,
        *,
        concurrency: int = 1,
        progress: Progress | None = None,
        on_error: str = "raise",
    ) -> Any:
        """Embed ``images`` in input order.

        ``on_error="raise"``: float32 ``[N, D]``; the first unusable image raises
        :class:`EmbeddingError` (``.index`` = its position). ``"skip"``: an :class:`EmbedResult`
        with the usable images' vectors, their positions and the failures.
        """
        check_options(kind, on_error)
        batches = self.embed_iter(
            images, kind, normalize, concurrency=concurrency, on_error=on_error
        )
        vectors, indices, failures = [], [], []
        for batch in batches:
            vectors.append(batch.vectors)
            indices.append(batch.indices)
            failures += batch.failures
            if progress is not None:
                progress(batch.count)
        if not vectors:  # an empty list still gets the right [0, D]
            vectors.append(np.zeros((0, self._dim(kind)), np.float32))
        stacked = np.concatenate(vectors)
        if on_error == "raise":
            return stacked
        index = np.concatenate(indices) if indices else np.zeros(0, np.int64)
        return EmbedResult(stacked, index, failures)

    def embed_iter(
        self,
        images: Iterable[ImageLike],
        kind: str = "features",
        normalize: bool = False,
        *,
        concurrency: int = 1,
        on_error: str = "skip",
        stream: bool = False,
    ) -> Iterator[EmbedBatch]:
        """Yield one :class:`EmbedBatch` per request, in input order, as answers arrive; at most
        ``concurrency`` requests are in flight (and in memory).

        ``stream=True`` (with ``on_error="skip"``): all requests on one ``EmbedStream`` call,
        up to ``2 × concurrency`` unanswered (``simclr_embed.client.stream``); unary calls where the
        server has no such RPC.
        """
        check_options(kind, on_error)
        skip = on_error == "skip"
        metadata = traced(self._metadata)  # here: the pool's threads lack the caller's context
        chunks = plan_chunks(images, self.max_batch, self._max_bytes, skip=skip)
        if stream and skip:
            try:
                yield from stream_batches(
                    self._stub.EmbedStream, chunks, kind=kind, normalize=normalize, skip=skip,
                    window=max(2, 2 * concurrency), resend=self.resend,
                    dim=lambda: self._dim(kind), metadata=metadata, backoff=backoff_s,
                    resendable=RESENDABLE,
                )  # fmt: skip
                return
            except StreamUnsupported as old_server:
                chunks = old_server.remaining
        if concurrency <= 1:  # no thread pool for the common one-at-a-time case
            for chunk in chunks:
                yield self._batch(chunk, kind, normalize, skip, metadata)
            return
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            pending: collections.deque[concurrent.futures.Future[EmbedBatch]] = collections.deque()
            try:
                for chunk in chunks:
                    if len(pending) >= concurrency:
                        yield pending.popleft().result()  # re-raises EmbeddingError
                    pending.append(pool.submit(self._batch, chunk, kind, normalize, skip, metadata))
                while pending:
                    yield pending.popleft().result()
            finally:
                for fut in pending:
                    fut.cancel()

    def _batch(
        self, chunk: Chunk, kind: str, normalize: bool, skip: bool, metadata: Any = None
    ) -> EmbedBatch:
        if not chunk.images:  # nothing sendable in this run of inputs
            return to_batch(chunk, None, self._dim(kind))
        request = build_request(chunk.images, kind, normalize, skip)
        return to_batch(chunk, self._call(request, chunk.start, metadata), 0)

    def _call(self, request: Any, start: int, metadata: Any = None) -> Any:
        md = self._metadata if metadata is None else metadata
        for attempt in range(self.resend + 1):
            try:
                return self._stub.Embed(request, timeout=self.timeout, metadata=md)
            except grpc.RpcError as exc:
                if exc.code() not in RESENDABLE or attempt == self.resend:
                    raise self._explained(exc, start) from None
            time.sleep(backoff_s(attempt))
        raise AssertionError("unreachable")

    def _explained(self, exc: grpc.RpcError, start: int) -> EmbeddingError:
        """A call that timed out waiting for a SERVING server says why no server answered."""
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            return rpc_error(exc, start)
        try:
            status = self.health()
        except grpc.RpcError as probe:
            return unreachable(self.target, self.timeout, probe) or rpc_error(exc, start)
        return not_serving(self.target, self.timeout, status) or rpc_error(exc, start)

    def _dim(self, kind: str) -> int:
        if kind not in self._dims:
            info = self.model_info()
            self._dims = {
                "features": info["feature_dimension"],
                "projection": info["projection_dimension"],
            }
        return self._dims[kind]

    def model_info(self) -> dict[str, Any]:
        """Model version, arch, image size, dimensions, max batch size and providers."""
        try:
            r = self._stub.GetModelInfo(INFO_REQUEST, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._explained(exc, 0) from None
        return info_dict(r)

    def health(self, service: str = SERVICE) -> str:
        """``"SERVING"``, ``"NOT_SERVING"``, ... (health needs no token; fails fast)."""
        r = self._health.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=min(self.timeout or PROBE_S, PROBE_S),
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Block until the server answers SERVING (model loaded and warm); TimeoutError if not."""
        end = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass  # not listening yet
            if time.monotonic() >= end:
                raise TimeoutError(f"{self.target} not SERVING after {timeout:.0f} s")
            time.sleep(0.2)

    def close(self) -> None:
        self._channel.close()
        self._probe.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
