"""Client-side proto ↔ numpy: the caller's images into request chunks, answers into results.

Shared by the blocking and the asyncio client. A chunk is a run of consecutive input images
(at most ``max_batch``, well under the message limit); with ``skip`` an input that cannot even
be sent (a file that cannot be read, an array of the wrong shape) becomes a :class:`Failure`
there, and the server reports the undecodable ones per image (``per_image_errors``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import grpc
import numpy as np
from PIL import Image

from simclr_embed.imageio import to_rgb
from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]  # noqa: UP007

KINDS = {"features": pb.EMBEDDING_KIND_FEATURES, "projection": pb.EMBEDDING_KIND_PROJECTION}
ON_ERROR = ("raise", "skip")
_INDEX_RE = re.compile(r"^image (\d+): ")


class EmbeddingError(RuntimeError):
    """The server refused a request. ``index`` is the offending image's position in the list
    given to ``embed`` (when the server named one)."""

    def __init__(self, code: grpc.StatusCode, details: str, index: int | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.index = code, details, index


@dataclass(frozen=True)
class Failure:
    """An input image that was left out: its position in the input and why."""

    index: int
    reason: str


@dataclass(frozen=True)
class EmbedBatch:
    """The results of ``count`` consecutive inputs starting at ``start``, in input order.

    ``vectors`` ``[n_ok, D]`` are the usable images' vectors; ``indices`` ``[n_ok]`` their
    positions in the input; ``failures`` the others.
    """

    start: int
    count: int
    vectors: np.ndarray
    indices: np.ndarray
    failures: list[Failure]
    timings: tuple[float, float, float] | None = None  # server ms: decode, queue, inference
    model_version: str = ""  # the model that made these vectors ("": nothing was sent)


@dataclass(frozen=True)
class EmbedResult:
    """``embed(..., on_error="skip")``: the usable images' vectors ``[n_ok, D]`` in input order,
    their positions ``[n_ok]``, and the images left out."""

    vectors: np.ndarray
    indices: np.ndarray
    failures: list[Failure]


@dataclass
class Chunk:
    """Consecutive inputs ``[start, start + count)``: the sendable ones and the unsendable."""

    start: int
    count: int = 0
    images: list[pb.Image] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # input index of each image
    failures: list[Failure] = field(default_factory=list)
    nbytes: int = 0


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


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"cannot read file: {exc.strerror or exc}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def plan_chunks(
    images: Iterable[ImageLike], max_batch: int, max_bytes: int, *, skip: bool
) -> Iterator[Chunk]:
    """Lazily yield chunks; a file is read only when its chunk is built.

    ``skip=False``: an image that cannot be sent raises (OSError, TypeError, ValueError).
    """
    chunk = Chunk(0)
    for i, item in enumerate(images):
        try:
            image = to_proto_image(item)
            nbytes = image.ByteSize()
            if nbytes > max_bytes:
                raise ValueError(f"image {i} is {nbytes / 2**20:.1f} MiB, over the message limit")
        except (OSError, TypeError, ValueError) as exc:
            if not skip:
                raise
            chunk.failures.append(Failure(i, _reason(exc)))
            chunk.count += 1
            continue
        if chunk.images and (len(chunk.images) == max_batch or chunk.nbytes + nbytes > max_bytes):
            yield chunk
            chunk = Chunk(i)
        chunk.images.append(image)
        chunk.positions.append(i)
        chunk.nbytes += nbytes
        chunk.count = i + 1 - chunk.start
    if chunk.count:
        yield chunk


def build_request(
    images: list[pb.Image], kind: str, normalize: bool, skip: bool
) -> pb.EmbedRequest:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return pb.EmbedRequest(
        images=images, kind=KINDS[kind], l2_normalize=normalize, per_image_errors=skip
    )


def check_options(kind: str, on_error: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def to_batch(chunk: Chunk, response: pb.EmbedResponse | None, dim: int) -> EmbedBatch:
    """A chunk and its answer (``None``: nothing was sendable) → :class:`EmbedBatch`."""
    failures = list(chunk.failures)
    timings, version = None, ""
    if response is None:
        vectors, positions = np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    else:
        bad = {e.index: e.reason for e in response.errors}
        failures += [Failure(chunk.positions[j], reason) for j, reason in bad.items()]
        keep = [j for j in range(len(chunk.positions)) if j not in bad]
        vectors = to_array(response, len(chunk.positions))[keep]  # [n_ok, D]
        positions = np.array([chunk.positions[j] for j in keep], np.int64)
        version = response.model_version
        if response.HasField("timings"):
            t = response.timings
            timings = (t.decode_ms, t.queue_ms, t.inference_ms)
    failures.sort(key=lambda f: f.index)
    return EmbedBatch(chunk.start, chunk.count, vectors, positions, failures, timings, version)


def to_array(response: pb.EmbedResponse, n: int | None = None) -> np.ndarray:
    """Either form of an answer → float32 ``[n, D]``: the packed matrix (little-endian bytes) or
    one ``repeated float`` per image."""
    d = response.dimension
    if response.packed_embeddings:
        rows = len(response.packed_embeddings) // (4 * d) if d else 0
        return np.frombuffer(response.packed_embeddings, "<f4").reshape(rows, d).astype(np.float32)
    if n is not None and any(len(e.values) == 0 for e in response.embeddings):  # per-image errors
        out = np.zeros((len(response.embeddings), d), np.float32)
        for i, e in enumerate(response.embeddings):
            if len(e.values):
                out[i] = e.values
        return out
    out = np.array([e.values for e in response.embeddings], dtype=np.float32)  # [n, D]
    return out.reshape(len(response.embeddings), d)


def rpc_error(exc: grpc.RpcError, start: int) -> EmbeddingError:
    """An RPC error → :class:`EmbeddingError`, the image index made absolute."""
    code, details = exc.code(), exc.details() or ""
    match = _INDEX_RE.match(details)
    if match is None:
        return EmbeddingError(code, details)
    index = start + int(match.group(1))
    return EmbeddingError(code, f"image {index}: {details[match.end() :]}", index)


def unreachable(target: str, timeout: float | None, probe: grpc.RpcError) -> EmbeddingError | None:
    if probe.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    return EmbeddingError(
        grpc.StatusCode.UNAVAILABLE,
        f"no server reachable at {target} within {timeout:g} s: {probe.details()}",
    )


def not_serving(target: str, timeout: float | None, status: str) -> EmbeddingError | None:
    if status == "SERVING":
        return None
    return EmbeddingError(
        grpc.StatusCode.UNAVAILABLE,
        f"{target} is {status} (starting up or draining) and no SERVING server answered "
        f"within {timeout:g} s",
    )


def info_dict(r: pb.GetModelInfoResponse) -> dict[str, Any]:
    return {
        "model_version": r.model_version,
        "arch": r.arch,
        "image_size": r.image_size,
        "feature_dimension": r.feature_dimension,
        "projection_dimension": r.projection_dimension,
        "max_batch_size": r.max_batch_size,
        "providers": list(r.providers),
    }
