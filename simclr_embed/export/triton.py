"""A Triton Inference Server model repository for an exported model: ``REPO/<name>/1/model.onnx`` +
``REPO/<name>/config.pbtxt`` (ONNX Runtime backend, dynamic batching).

Shapes come from the ONNX graph itself: with ``max_batch_size > 0`` Triton adds the batch axis, so
``dims`` list only the per-image shape (``[S, S, 3]`` in, ``[F]`` / ``[P]`` out). Field names follow
Triton's ``model_config.proto`` (``ModelConfig``, ``ModelInput``, ``ModelDynamicBatching``,
``ModelInstanceGroup``); the tests parse the text with that schema.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import onnx

from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

# ONNX TensorProto element type → Triton DataType enum name.
TRITON_TYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
}
KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}


def tensor_specs(values: Any) -> list[tuple[str, str, list[int]]]:
    """(name, Triton type, dims without the batch axis) of graph inputs/outputs; -1 = dynamic."""
    specs = []
    for v in values:
        tt = v.type.tensor_type
        if tt.elem_type not in TRITON_TYPES:
            raise SimclrError(f"tensor {v.name!r}: ONNX type {tt.elem_type} has no Triton type")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        specs.append((v.name, TRITON_TYPES[tt.elem_type], dims[1:]))  # dims[0] is the batch N
    return specs


def _tensor_block(field: str, specs: list[tuple[str, str, list[int]]]) -> list[str]:
    lines = [f"{field} ["]
    for i, (name, dtype, dims) in enumerate(specs):
        lines += [
            "  {",
            f'    name: "{name}"',
            f"    data_type: {dtype}",
            f"    dims: [ {', '.join(str(d) for d in dims)} ]",
            "  }" + ("," if i < len(specs) - 1 else ""),
        ]
    return [*lines, "]"]


def render_config(
    model: onnx.ModelProto,
    *,
    name: str,
    max_batch_size: int = 32,
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    kind: str = "auto",
) -> str:
    """The ``config.pbtxt`` text for ``model`` (protobuf text format of Triton's ModelConfig)."""
    if kind not in KINDS:
        raise SimclrError(f"unknown instance kind {kind!r}; choose one of {', '.join(KINDS)}")
    meta = {p.key: p.value for p in model.metadata_props}
    initializers = {t.name for t in model.graph.initializer}
    inputs = tensor_specs([v for v in model.graph.input if v.name not in initializers])
    outputs = tensor_specs(model.graph.output)
    lines = [
        f"# simclr-embed {meta.get('simclr.arch', '?')} at {meta.get('simclr.image_size', '?')} px, "
        f"{meta.get('simclr.precision', '?')}, model_version {meta.get('simclr.model_version', '?')}",
        "# images: uint8 RGB NHWC pixels, brought to S×S by the resize policy "
        f"'{meta.get('simclr.resize', '?')}'; the graph normalizes. Outputs are not L2-normalized.",
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        *_tensor_block("input", inputs),
        *_tensor_block("output", outputs),
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {instances}",
        f"    kind: {KINDS[kind]}",
        "  }",
        "]",
    ]
    return "\n".join(lines) + "\n"


def write_triton_repo(
    model_path: str | Path,
    repo: str | Path,
    *,
    name: str = "simclr",
    max_batch_size: int = 32,
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    kind: str = "auto",
    version: int = 1,
) -> dict[str, str]:
    """Copy ``model_path`` to ``repo/name/version/model.onnx`` and write ``repo/name/config.pbtxt``.

    Both files are written atomically; returns their paths and the config text.
    """
    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    text = render_config(
        model,
        name=name,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        kind=kind,
    )
    model_dir = Path(repo) / name
    target = model_dir / str(version) / "model.onnx"
    with atomic_path(target) as tmp:
        shutil.copyfile(model_path, tmp)
    config = model_dir / "config.pbtxt"
    atomic_write_text(config, text)
    log.info("wrote Triton model %s (version %d)", model_dir, version)
    return {"model": str(target), "config": str(config), "text": text}
