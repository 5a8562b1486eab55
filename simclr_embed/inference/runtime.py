"""Open a model file as a :class:`Runtime`: ``.pt2`` → torch (imported only then), else ONNX
Runtime. The one entry point the server, the offline job and the Ray job open models with."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from simclr_embed.errors import SimclrError
from simclr_embed.inference.model_info import (
    INPUT,
    OUTPUTS,
    ModelInfo,
    Runtime,
    bucket_sizes,
    pad_to_bucket,
    select_output,
    usable_cores,
)
from simclr_embed.inference.onnx_runtime import OnnxRuntime

__all__ = [
    "INPUT",
    "OUTPUTS",
    "ModelInfo",
    "OnnxRuntime",
    "Runtime",
    "bucket_sizes",
    "open_runtime",
    "pad_to_bucket",
    "select_output",
    "usable_cores",
]

log = logging.getLogger(__name__)


_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def check_model_file(path: str | os.PathLike[str]) -> Path:
    """Refuse, with what to do instead, a file that cannot be a servable model — before a server
    binds its port or a job starts (an ONNX Runtime parse error says neither)."""
    path = Path(path)
    if not path.exists():
        raise SimclrError(f"model file not found: {path}")
    if path.is_dir():
        raise SimclrError(f"--model {path} is a folder; give the exported .onnx file (or a .pt2)")
    with open(path, "rb") as f:
        head = f.read(4)
    if path.suffix == ".pt2":
        return path
    if path.suffix in CHECKPOINT_SUFFIXES or head == _ZIP or head[:1] == _PICKLE:
        raise SimclrError(
            f"{path} is a training checkpoint, not a servable model; export it first: "
            f"simclr export-onnx --checkpoint {path} --output model.onnx (add --torch-program "
            "model.pt2 for the torch runtime), then serve model.onnx"
        )
    return path


def open_runtime(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    max_batch_size: int = 32,
    intra_op_threads: int = 0,
    tensorrt: bool = False,
    precision: str = "auto",
    idle_threads: int = 0,
) -> Runtime:
    """The runtime for a model file: ``.pt2`` → torch (imported only then), else ONNX Runtime."""
    check_model_file(path)
    if Path(path).suffix == ".pt2":
        try:
            from simclr_embed.inference.torch_runtime import TorchRuntime
        except ImportError as exc:
            raise SimclrError(
                f"serving a torch program (.pt2) needs torch ({exc.name} is missing): "
                "pip install 'simclr-embed[export]', or serve the .onnx file"
            ) from None
        return TorchRuntime(
            path,
            device=device,
            max_batch_size=max_batch_size,
            intra_op_threads=intra_op_threads,
            precision=precision,
        )
    if precision not in ("auto", "fp32"):
        log.warning(
            "--precision %s applies to .pt2 models; an ONNX model runs as exported", precision
        )
    return OnnxRuntime(
        path,
        device=device,
        max_batch_size=max_batch_size,
        intra_op_threads=intra_op_threads,
        tensorrt=tensorrt,
        idle_threads=idle_threads,
    )
