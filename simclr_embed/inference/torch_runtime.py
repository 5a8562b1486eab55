"""torch runtime: ``encode(uint8 [N, S, S, 3])`` over a ``torch.export`` program (``.pt2``).

The same contract as ``simclr_embed.inference.onnx_runtime.OnnxRuntime`` (the batcher and servicer cannot tell them
apart), for GPUs whose CUDA stack has no matching ``onnxruntime-gpu`` build and for measuring
the batching server on a GPU with torch alone. Imported only for ``.pt2`` models: the serve
install stays torch-free.

CUDA: the program is moved to the GPU (``move_to_device_pass``), weights channels_last (the
input permute NHWC → NCHW already gives channels_last activations), bf16 autocast (fp16 where
bf16 is not supported), cuDNN autotuning over the same power-of-two batch buckets as the ONNX
path, all warmed up before SERVING; each calling thread copies and runs on its own CUDA stream,
so with 2 batches in flight one batch's copies overlap the other's kernels. CPU: fp32 (or bf16
autocast when asked), torch intra-op threads as given.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch

from simclr_embed.errors import SimclrError
from simclr_embed.inference.model_info import (
    OUTPUTS,
    ModelInfo,
    bucket_sizes,
    model_info_from_metadata,
    pad_to_bucket,
)
from simclr_embed.inference.model_info import usable_cores as _usable_cores

log = logging.getLogger(__name__)

METADATA_FILE = "simclr.json"  # the simclr.* metadata inside the .pt2 archive (export writes it)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def load_program(
    source: str | os.PathLike[str] | io.BytesIO,
) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """A ``.pt2`` written by ``simclr export-onnx --torch-program`` → (program, ``simclr.*``)."""
    extra = {METADATA_FILE: ""}
    where = source if isinstance(source, io.BytesIO) else str(source)
    try:
        program = torch.export.load(where, extra_files=extra)
    except Exception as exc:  # not a zip, another torch's format, truncated, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SimclrError(f"cannot load torch program {source}: {first}") from None
    try:
        meta = json.loads(extra[METADATA_FILE] or "{}")
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or "simclr.image_size" not in meta:
        raise SimclrError(f"{source} has no simclr metadata (not written by simclr export-onnx)")
    return program, {str(k): str(v) for k, v in meta.items()}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on a GPU that has it, else fp16 on GPU; fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class TorchRuntime:
    """A ``.pt2`` program on CUDA or CPU; ``encode`` is thread-safe.

    Args:
        path: the ``.pt2`` file.
        device: ``auto`` (CUDA when torch sees a GPU), ``cpu`` or ``cuda``.
        max_batch_size: largest batch ``encode`` will get (CUDA buckets and warm-up).
        intra_op_threads: torch CPU threads (0 = usable cores).
        precision: ``auto``, ``bf16``, ``fp16`` (autocast) or ``fp32``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        max_batch_size: int = 32,
        intra_op_threads: int = 0,
        precision: str = "auto",
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SimclrError(f"model file not found: {self.path}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise SimclrError("--device cuda: torch sees no CUDA device")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.on_gpu = self.device.type == "cuda"
        self.precision = resolve_precision(precision, self.device)
        self._amp = _DTYPES[self.precision]
        self.max_batch_size = max_batch_size
        program, meta = load_program(self.path)
        self.info: ModelInfo = model_info_from_metadata(meta, self.path)
        if self.on_gpu:
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, self.device)
            torch.backends.cudnn.benchmark = True  # autotuned per bucket shape in warm_up()
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        else:
            torch.set_num_threads(intra_op_threads or _usable_cores())
        module = program.module()
        if self.on_gpu:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.buckets = bucket_sizes(max_batch_size) if self.on_gpu else None
        self.providers = [f"torch-{self.device.type}-{self.precision}"]
        self._local = threading.local()  # one CUDA stream per calling thread
        log.info(
            "model %s (%s, %d px, version %s) on torch %s, %s",
            self.path,
            self.info.arch,
            self.info.image_size,
            self.info.model_version,
            self.device,
            self.precision,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self._amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._amp)

    def _stream(self) -> torch.cuda.Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return stream

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 ``[N, S, S, 3]`` → float32 ``{"features": [N, F], "projection": [N, P]}``."""
        n = len(images)
        batch = pad_to_bucket(images, self.buckets) if self.buckets else images
        # [B, S, S, 3] uint8, shares memory; a read-only view (one raw image straight from the
        # request bytes) is copied, since torch tensors cannot be read-only
        x = torch.from_numpy(np.require(batch, requirements=["C", "W"]))
        with torch.inference_mode():
            if not self.on_gpu:
                with self._autocast():
                    outs = self.module(x)
                return {k: t.float().numpy()[:n] for k, t in zip(OUTPUTS, outs, strict=True)}
            stream = self._stream()
            with torch.cuda.stream(stream), self._autocast():
                # uint8 over PCIe: 4x less than float; pinned so the copy is a real async DMA.
                xd = x.pin_memory().to(self.device, non_blocking=True)
                outs = [t.float() for t in self.module(xd)]
                host = [t.to("cpu", non_blocking=True) for t in outs]
            stream.synchronize()
        return {k: t.numpy()[:n] for k, t in zip(OUTPUTS, host, strict=True)}

    def warm_up(self) -> None:
        """Every batch shape once (allocator growth, cuDNN autotuning) before SERVING."""
        s = self.info.image_size
        sizes = self.buckets or sorted({1, self.max_batch_size})
        for b in sizes:
            self.encode(np.zeros((b, s, s, 3), np.uint8))
        log.info("warmed up batch sizes %s", list(sizes))
