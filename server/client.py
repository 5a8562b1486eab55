"""Python client of the embedding service (CONTRACT §5): ``EmbeddingClient`` and ``AsyncEmbeddingClient``.

    with EmbeddingClient("127.0.0.1:50051", token=None) as client:
        vectors = client.embed(["a.jpg", "b.png"], kind="features", normalize=True)  # [2, D]

Images may be paths, encoded file bytes, PIL images or uint8 HWC arrays (gray, RGB or RGBA).
Large lists are sent as several requests of at most ``max_batch`` images (and well under the
message limit), optionally ``concurrency`` at a time, and reassembled in order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.target, self.timeout, self.max_batch = target, timeout, max_batch
        self._max_bytes = int(max_message_mb * 2**20 * 0.9)  # headroom for the message framing
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._creds = _credentials(tls)
        self._options = [
            ("grpc.max_send_message_length", max_message_mb * 2**20),
            ("grpc.max_receive_message_length", max_message_mb * 2**20),
        ]


class EmbeddingClient(_ClientBase):
    """Blocking client; thread-safe (one channel, any number of threads)."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        tls: bool | str | os.PathLike | bytes = False,
        timeout: float | None = 60.0,
        max_batch: int = 64,
        max_message_mb: int = 64,
    ) -> None:
        super().__init__(target, token, tls, timeout, max_batch, max_message_mb)
        if self._creds is None:
            self._channel = grpc.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.secure_channel(target, self._creds, options=self._options)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

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
            raise _error(exc, start) from None
        return start, _to_array(response)

    def model_info(self) -> dict[str, Any]:
        """Model version, arch, image size, dimensions, max batch size and providers."""
        try:
            r = self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _error(exc, 0) from None
        return _info_dict(r)

    def health(self, service: str = SERVICE) -> str:
        """``"SERVING"``, ``"NOT_SERVING"``, ... (health needs no token)."""
        r = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
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
    ) -> None:
        super().__init__(target, token, tls, timeout, max_batch, max_message_mb)
        if self._creds is None:
            self._channel = grpc.aio.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(target, self._creds, options=self._options)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)

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
                raise _error(exc, start) from None
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
            raise _error(exc, 0) from None
        return _info_dict(r)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
