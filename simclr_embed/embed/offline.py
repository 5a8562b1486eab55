"""Embed files in this process, no server: the server's own preprocessing and runtime.

The same ``simclr_embed.inference.images.Preprocessor.from_encoded`` the server runs on request bytes (here on
the file's bytes) and the same ``simclr_embed.inference.runtime`` session and output selection, so a file gives
the same vector offline, through ``simclr serve`` and through Ray. Decoding runs in a thread
pool (Pillow releases the GIL); up to ``inflight`` batches are in progress at once, so one
batch decodes while the previous one is in the model. Results come out in input order, as
:class:`simclr_embed.client.codec.EmbedBatch` — the same stream ``EmbeddingClient.embed_iter`` yields.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from simclr_embed.client.codec import EmbedBatch, Failure, check_options
from simclr_embed.inference.images import DEFAULT_MAX_PIXELS, ImageError, Preprocessor
from simclr_embed.inference.runtime import open_runtime, select_output, usable_cores

OUTPUT_FOR_KIND = {"features": "features", "projection": "projection"}


def decode_file(item: str | os.PathLike[str] | bytes, pre: Preprocessor) -> np.ndarray | str:
    """A file (or its bytes) → ``[S, S, 3]`` uint8, or the reason it cannot be used."""
    try:
        data = item if isinstance(item, bytes) else Path(item).read_bytes()
    except OSError as exc:
        return f"cannot read file: {exc.strerror or exc}"
    try:
        return pre.from_encoded(data)
    except ImageError as exc:
        return str(exc)


class OfflineEmbedder:
    """An ONNX (or ``.pt2``) model in this process, behind the client's ``embed_iter`` API.

    Args:
        model: the exported model file.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch: images per model call.
        decode_threads: decode pool size (0 = usable cores).
        intra_op_threads: runtime CPU threads per call (0 = cores / ``inflight``).
        inflight: batches in progress at once (decode of one overlaps the model of another).
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        device: str = "auto",
        batch: int = 64,
        decode_threads: int = 0,
        intra_op_threads: int = 0,
        inflight: int = 2,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        cores = usable_cores()
        self.batch, self.inflight = batch, max(1, inflight)
        self.runtime = open_runtime(
            model,
            device=device,
            max_batch_size=batch,
            intra_op_threads=intra_op_threads or max(1, cores // self.inflight),
        )
        info = self.runtime.info
        self.pre = Preprocessor(info.image_size, info.resize, max_pixels)
        self._decode = concurrent.futures.ThreadPoolExecutor(
            decode_threads or cores, thread_name_prefix="simclr-decode"
        )
        self._stages = concurrent.futures.ThreadPoolExecutor(
            self.inflight, thread_name_prefix="simclr-batch"
        )

    def model_info(self) -> dict[str, Any]:
        info = self.runtime.info
        return {
            "model_version": info.model_version,
            "arch": info.arch,
            "image_size": info.image_size,
            "feature_dimension": info.feature_dim,
            "projection_dimension": info.projection_dim,
            "max_batch_size": self.batch,
            "providers": list(self.runtime.providers),
        }

    def _run(self, start: int, items: list[Any], kind: str, normalize: bool) -> EmbedBatch:
        decoded = list(self._decode.map(lambda it: decode_file(it, self.pre), items))
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        failures = [Failure(start + i, d) for i, d in enumerate(decoded) if isinstance(d, str)]
        dim = (
            self.runtime.info.feature_dim
            if kind == "features"
            else self.runtime.info.projection_dim
        )
        vectors = np.zeros((0, dim), np.float32)
        if good:
            images = np.stack([decoded[i] for i in good])  # [n_ok, S, S, 3]
            vectors = select_output(self.runtime.encode(images), OUTPUT_FOR_KIND[kind], normalize)
        indices = np.array([start + i for i in good], np.int64)
        version = self.runtime.info.model_version
        return EmbedBatch(start, len(items), vectors, indices, failures, model_version=version)

    def embed_iter(
        self,
        images: Iterable[Any],
        kind: str = "features",
        normalize: bool = False,
        *,
        on_error: str = "skip",
    ) -> Iterator[EmbedBatch]:
        """Paths (or encoded bytes) → :class:`EmbedBatch` per ``batch`` inputs, in order.

        ``on_error="raise"`` is not offered here: the bulk job decides what a failure means.
        """
        check_options(kind, on_error)
        pending: collections.deque[concurrent.futures.Future[EmbedBatch]] = collections.deque()
        chunk: list[Any] = []
        start = 0
        try:
            for i, item in enumerate(images):
                chunk.append(item)
                if len(chunk) == self.batch:
                    if len(pending) >= self.inflight:
                        yield pending.popleft().result()
                    pending.append(self._stages.submit(self._run, start, chunk, kind, normalize))
                    start, chunk = i + 1, []
            if chunk:
                pending.append(self._stages.submit(self._run, start, chunk, kind, normalize))
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()

    def close(self) -> None:
        self._stages.shutdown(wait=True, cancel_futures=True)
        self._decode.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> OfflineEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
