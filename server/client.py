"""Python client of the embedding service (CONTRACT §5): ``EmbeddingClient`` and ``AsyncEmbeddingClient``.

    with EmbeddingClient("127.0.0.1:50051", token=None) as client:
        vectors = client.embed(["a.jpg", "b.png"], kind="features", normalize=True)  # [2, D]

Images may be paths, encoded file bytes, PIL images or uint8 HWC arrays (gray, RGB or RGBA).
Large lists are sent as several requests of at most ``max_batch`` images (and well under the
message limit), optionally ``concurrency`` at a time, and reassembled in order.

Rolling restarts cost latency, not errors (:func:`service_config`): the channel balances
round-robin over every address the target resolves to, watches each server's health and sends
only to SERVING ones, waits for one to be ready (up to the call's timeout) instead of failing
fast, and retries UNAVAILABLE / RESOURCE_EXHAUSTED answers with gRPC's own exponential backoff.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from server.pb.simclr.v1 import embedding_pb2 as pb
from server.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from simclr_embed.imageio import to_rgb

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]  # noqa: UP007
Progress = Callable[[int], None]  # called with the number of images just embedded

KINDS = {"features": pb.EMBEDDING_KIND_FEATURES, "projection": pb.EMBEDDING_KIND_PROJECTION}
SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
_INDEX_RE = re.compile(r"^image (\d+): ")

# gRPC caps maxAttempts at 5. Backoff n waits random(0, min(initial·mult^(n-1), max)) seconds.
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
}


def service_config(*, retry: bool = True, health_check: bool = True) -> dict[str, Any]:
    """The channel's service config (gRPC's own machinery, no hand-written retry loop).

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


class EmbeddingError(RuntimeError):
    """The server refused a request. ``index`` is the offending image's position in the list
    given to ``embed`` (when the server named one)."""

    def __init__(self, code: grpc.StatusCode, details: str, index: int | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.index = code, details, index


def to_proto_image(item: ImageLike) -> pb.Image:
    """One image → ``simclr.v1.Image`` (files and bytes as encoded, pixels as raw)."""
    if isinstance(item, (str, os.PathLike)):
        return pb.Image(encoded=Path(item).read_bytes())
    if isinstance(item, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(item))
    if isinstance(item, Image.Image):
        item = np.asarray(to_rgb(item))
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise TypeError(f"arrays must be uint8 HWC, got {item.dtype}")
        if item.ndim == 3 and item.shape[2] == 4:  # RGBA: composite on white like the server would
            item = np.asarray(to_rgb(Image.fromarray(item)))
        if item.ndim == 2:
            item = item[:, :, None]
        if item.ndim != 3 or item.shape[2] not in (1, 3):
            raise ValueError(f"arrays must be HxW, HxWx1, HxWx3 or HxWx4; got shape {item.shape}")
        h, w, c = item.shape
        raw = pb.RawImage(
            pixels=np.ascontiguousarray(item).tobytes(), height=h, width=w, channels=c
        )
        return pb.Image(raw=raw)
    raise TypeError(f"cannot send {type(item).__name__} as an image")


def _chunks(
    images: Iterable[ImageLike], max_batch: int, max_bytes: int
) -> Iterator[tuple[int, list[pb.Image]]]:
    """Lazily yield ``(start index, proto images)``; files are read only when their chunk is built."""
    chunk: list[pb.Image] = []
    size = start = 0
    for i, item in enumerate(images):
        image = to_proto_image(item)
        nbytes = image.ByteSize()
        if nbytes > max_bytes:
            raise ValueError(f"image {i} is {nbytes / 2**20:.1f} MiB, over the message limit")
        if chunk and (len(chunk) == max_batch or size + nbytes > max_bytes):
            yield start, chunk
            chunk, size, start = [], 0, i
        chunk.append(image)
        size += nbytes
    if chunk:
        yield start, chunk


def _request(images: list[pb.Image], kind: str, normalize: bool) -> pb.EmbedRequest:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return pb.EmbedRequest(images=images, kind=KINDS[kind], l2_normalize=normalize)


def _to_array(response: pb.EmbedResponse) -> np.ndarray:
    out = np.array([e.values for e in response.embeddings], dtype=np.float32)  # [n, D]
    return out.reshape(len(response.embeddings), response.dimension)


def _error(exc: grpc.RpcError, start: int) -> EmbeddingError:
    code, details = exc.code(), exc.details() or ""
    match = _INDEX_RE.match(details)
    if match is None:
        return EmbeddingError(code, details)
    index = start + int(match.group(1))
    return EmbeddingError(code, f"image {index}: {details[match.end() :]}", index)


_PROBE_S = 5.0  # health probes fail fast: they answer "is anyone there?"


def _unreachable(target: str, timeout: float | None, probe: grpc.RpcError) -> EmbeddingError | None:
    if probe.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    return EmbeddingError(
        grpc.StatusCode.UNAVAILABLE,
        f"no server reachable at {target} within {timeout:g} s: {probe.details()}",
    )


def _not_serving(target: str, timeout: float | None, status: str) -> EmbeddingError | None:
    if status == "SERVING":
        return None
    return EmbeddingError(
        grpc.StatusCode.UNAVAILABLE,
        f"{target} is {status} (starting up or draining) and no SERVING server answered "
        f"within {timeout:g} s",
    )


def _info_dict(r: pb.GetModelInfoResponse) -> dict[str, Any]:
    return {
        "model_version": r.model_version,
        "arch": r.arch,
        "image_size": r.image_size,
        "feature_dimension": r.feature_dimension,
        "projection_dimension": r.projection_dimension,
        "max_batch_size": r.max_batch_size,
        "providers": list(r.providers),
    }


def _credentials(tls: bool | str | os.PathLike | bytes) -> grpc.ChannelCredentials | None:
    """``False``: plaintext; ``True``: TLS with system roots; a path or PEM bytes: that root CA."""
    if tls is False or tls is None:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    pem = tls if isinstance(tls, bytes) else Path(tls).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=pem)


class _ClientBase:
    def __init__(
        self,
        target: str,
        token: str | None,
        tls: bool | str | os.PathLike | bytes,
        timeout: float | None,
        max_batch: int,
        max_message_mb: int,
        retry: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.target, self.timeout, self.max_batch = target, timeout, max_batch
        self._max_bytes = int(max_message_mb * 2**20 * 0.9)  # headroom for the message framing
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._creds = _credentials(tls)
        limits = [
            ("grpc.max_send_message_length", max_message_mb * 2**20),
            ("grpc.max_receive_message_length", max_message_mb * 2**20),
        ]
        self._options = [
            *limits,
            ("grpc.service_config", json.dumps(service_config(retry=retry))),
            ("grpc.enable_retries", int(retry)),
            # A call is retried only while its request is still buffered (default 256 KiB).
            ("grpc.per_rpc_retry_buffer_size", max_message_mb * 2**20),
        ]
        # Health checks go over a channel of their own: on the main one, a NOT_SERVING server is
        # not routed to at all, so its health could not be asked.
        self._health_options = limits

    def _make_channel(self, aio: bool, options: list[tuple[str, Any]]) -> Any:
        mod = grpc.aio if aio else grpc
        if self._creds is None:
            return mod.insecure_channel(self.target, options=options)
        return mod.secure_channel(self.target, self._creds, options=options)


class EmbeddingClient(_ClientBase):
    """Blocking client; thread-safe (one channel, any number of threads).

    Args:
        target: ``HOST:PORT``, ``dns:///name:port`` (every address, round-robin) or
            ``ipv4:a:p,b:p``.
        token: bearer token for a server started with ``--auth-token``.
        tls: ``False``, ``True`` (system roots) or a root CA (path or PEM bytes).
        timeout: seconds per call, waiting for a SERVING server and retries included.
        max_batch: most images per request.
        retry: gRPC's retry policy (:data:`RETRY_POLICY`); ``False`` sends every call once.
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        tls: bool | str | os.PathLike | bytes = False,
        timeout: float | None = 60.0,
        max_batch: int = 64,
        max_message_mb: int = 64,
        retry: bool = True,
    ) -> None:
        super().__init__(target, token, tls, timeout, max_batch, max_message_mb, retry)
        self._channel = self._make_channel(False, self._options)
        self._health_channel = self._make_channel(False, self._health_options)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._health_channel)

    def embed(
        self,
        images: Sequence[ImageLike] | Iterable[ImageLike],
        kind: str = "features",
        normalize: bool = False,
        *,
        concurrency: int = 1,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Embed ``images`` → float32 ``[N, D]`` in input order (raises :class:`EmbeddingError`)."""
        _request([], kind, normalize)  # validate kind before reading any file
        parts: dict[int, np.ndarray] = {}
        if concurrency <= 1:  # no thread pool for the common one-at-a-time case
            for start, chunk in _chunks(images, self.max_batch, self._max_bytes):
                parts[start] = self._call(start, chunk, kind, normalize)[1]
                if progress is not None:
                    progress(len(parts[start]))
            return self._assemble(parts, kind)
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            pending: list[concurrent.futures.Future[tuple[int, np.ndarray]]] = []
            for start, chunk in _chunks(images, self.max_batch, self._max_bytes):
                if len(pending) >= concurrency:  # bound how many chunks sit in memory
                    done, _ = concurrent.futures.wait(pending, return_when="FIRST_COMPLETED")
                    pending = [f for f in pending if f not in done]
                    self._collect(done, parts, progress)
                pending.append(pool.submit(self._call, start, chunk, kind, normalize))
            self._collect(concurrent.futures.wait(pending).done, parts, progress)
        return self._assemble(parts, kind)

    def _assemble(self, parts: dict[int, np.ndarray], kind: str) -> np.ndarray:
        if not parts:  # an empty list still gets the right [0, D]
            info = self.model_info()
            dim = info["projection_dimension" if kind == "projection" else "feature_dimension"]
            return np.zeros((0, dim), np.float32)
        return np.concatenate([parts[k] for k in sorted(parts)])

    @staticmethod
    def _collect(
        done: Iterable[concurrent.futures.Future],
        parts: dict[int, np.ndarray],
        progress: Progress | None,
    ) -> None:
        for fut in done:
            start, arr = fut.result()  # re-raises EmbeddingError
            parts[start] = arr
            if progress is not None:
                progress(len(arr))

    def _call(
        self, start: int, chunk: list[pb.Image], kind: str, normalize: bool
    ) -> tuple[int, np.ndarray]:
        try:
            response = self._stub.Embed(
                _request(chunk, kind, normalize), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._explained(exc, start) from None
        return start, _to_array(response)

    def _explained(self, exc: grpc.RpcError, start: int) -> EmbeddingError:
        """A call that timed out waiting for a SERVING server says why no server answered."""
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            return _error(exc, start)
        try:
            status = self.health()
        except grpc.RpcError as probe:
            return _unreachable(self.target, self.timeout, probe) or _error(exc, start)
        return _not_serving(self.target, self.timeout, status) or _error(exc, start)

    def model_info(self) -> dict[str, Any]:
        """Model version, arch, image size, dimensions, max batch size and providers."""
        try:
            r = self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._explained(exc, 0) from None
        return _info_dict(r)

    def health(self, service: str = SERVICE) -> str:
        """``"SERVING"``, ``"NOT_SERVING"``, ... (health needs no token; fails fast)."""
        r = self._health.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=min(self.timeout or _PROBE_S, _PROBE_S),
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
        self._health_channel.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEmbeddingClient(_ClientBase):
    """asyncio client on ``grpc.aio``; create and use it inside one running event loop."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        tls: bool | str | os.PathLike | bytes = False,
        timeout: float | None = 60.0,
        max_batch: int = 64,
        max_message_mb: int = 64,
        retry: bool = True,
    ) -> None:
        super().__init__(target, token, tls, timeout, max_batch, max_message_mb, retry)
        self._channel = self._make_channel(True, self._options)
        self._health_channel = self._make_channel(True, self._health_options)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._health_channel)

    async def _explained(self, exc: grpc.RpcError, start: int) -> EmbeddingError:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            return _error(exc, start)
        try:
            status = await self.health()
        except grpc.RpcError as probe:
            return _unreachable(self.target, self.timeout, probe) or _error(exc, start)
        return _not_serving(self.target, self.timeout, status) or _error(exc, start)

    async def health(self, service: str = SERVICE) -> str:
        """``"SERVING"``, ``"NOT_SERVING"``, ... (health needs no token; fails fast)."""
        r = await self._health.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=min(self.timeout or _PROBE_S, _PROBE_S),
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    async def embed(
        self,
        images: Sequence[ImageLike] | Iterable[ImageLike],
        kind: str = "features",
        normalize: bool = False,
        *,
        concurrency: int = 1,
    ) -> np.ndarray:
        """Embed ``images`` → float32 ``[N, D]``, up to ``concurrency`` requests at a time."""
        _request([], kind, normalize)
        slots = asyncio.Semaphore(max(1, concurrency))
        tasks: list[asyncio.Task[np.ndarray]] = []

        async def call(start: int, chunk: list[pb.Image]) -> np.ndarray:
            try:
                response = await self._stub.Embed(
                    _request(chunk, kind, normalize), timeout=self.timeout, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                raise await self._explained(exc, start) from None
            finally:
                slots.release()
            return _to_array(response)

        try:
            for start, chunk in _chunks(images, self.max_batch, self._max_bytes):
                await slots.acquire()  # bound how many chunks sit in memory
                tasks.append(asyncio.ensure_future(call(start, chunk)))
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        if not parts:
            info = await self.model_info()
            dim = info["projection_dimension" if kind == "projection" else "feature_dimension"]
            return np.zeros((0, dim), np.float32)
        return np.concatenate(parts)

    async def model_info(self) -> dict[str, Any]:
        try:
            r = await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise await self._explained(exc, 0) from None
        return _info_dict(r)

    async def close(self) -> None:
        await self._channel.close()
        await self._health_channel.close()

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
