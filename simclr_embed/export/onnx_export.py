"""Checkpoint → self-contained ONNX model: preprocessing wrapper, export, metadata, atomic write.

The graph takes what any client has, uint8 RGB pixels ``images [N, S, S, 3]``, and does the rest
(cast, /255, mean/std, NHWC→NCHW, backbone, head), so no runtime needs this code base.

Exporter choice (torch 2.14, measured in bench/export.py): ``auto`` uses ``dynamo=True``
(torch.export + onnxscript) for opset ≥ 18: it is torch's default and maintained path (the
TorchScript exporter is deprecated and warns), and traced with N=2 and a ``Dim`` it keeps the
batch axis symbolic (N=1 would be specialised away). Its costs: exporting is ~3× slower, and
its lowest native opset is 18 — the conversion to 17 fails and it then silently keeps 18 — so
opset 17 goes through the TorchScript exporter, which stays selectable
(``exporter="torchscript"``). Both pass the same parity checks (tests/export).
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_path
from simclr_embed.imageio import IMAGENET_MEAN, IMAGENET_STD, resize_policy_for
from simclr_embed.training.checkpoint import load_checkpoint
from simclr_embed.training.model import SimCLRModel, build_model

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAMES = ("features", "projection")
MIN_OPSET = 17
EXPORTERS = ("auto", "dynamo", "torchscript")
DYNAMO_MIN_OPSET = 18  # below this torch 2.14's dynamo exporter cannot convert (fails for 17)
META_PREFIX = "simclr."
FEATURES_FROM = ("backbone", "head1")  # where the "features" output is taken


class ImageEncoder(nn.Module):
    """uint8 ``[N, S, S, 3]`` RGB → (features ``[N, F]``, projection ``[N, P]``), both float32.

    With ``half=True`` the network runs in float16 while the boundary stays uint8 in / float32
    out; normalization is done in float32 first so the uint8 → [-2.1, 2.6] step loses nothing.
    """

    def __init__(
        self,
        model: SimCLRModel,
        mean: Sequence[float],
        std: Sequence[float],
        half: bool = False,
        features_from: str = "backbone",
    ) -> None:
        super().__init__()
        if features_from not in FEATURES_FROM:
            raise ValueError(f"features_from must be one of {FEATURES_FROM}, got {features_from!r}")
        if features_from == "head1" and model.proj_layers < 2:
            raise SimclrError("--export-features head1 needs a projection head of 2+ layers")
        self.model = model.half() if half else model
        self.half, self.features_from = half, features_from
        self.mean_values, self.std_values = [float(v) for v in mean], [float(v) for v in std]
        # [1, 1, 1, 3]: broadcasts over NHWC before the transpose.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 1, 1, 3))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 1, 1, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # uint8 / float promotes to float32. No explicit .float()/.to(): torch.export records
        # those with the tracing device and dtype asserted, which would pin a torch program to
        # the CPU and break autocast (the torch runtime serves the same wrapper on CUDA).
        x = (images / 255.0 - self.mean) / self.std  # [N, S, S, 3] float32
        x = x.permute(0, 3, 1, 2)  # [N, 3, S, S]
        h = self.model.forward_features(x.half() if self.half else x)  # [N, F]
        z = self.model.forward_head(h)  # [N, P]
        if self.features_from == "head1":  # SimCLRv2: the first projection layer [N, hidden]
            h = self.model.forward_head1(h)
        return (h.float(), z.float()) if self.half else (h, z)

    @property
    def feature_dim(self) -> int:
        return self.model.proj_hidden if self.features_from == "head1" else self.model.feature_dim


def load_encoder(
    checkpoint: str | Path, *, half: bool = False, features_from: str = "backbone"
) -> tuple[ImageEncoder, dict[str, Any]]:
    """Rebuild the eval-mode wrapper from a checkpoint; returns (encoder, checkpoint dict)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt["config"]
    if not isinstance(cfg, dict) or not {"arch", "image_size", "proj_dim"} <= cfg.keys():
        raise SimclrError(
            f"checkpoint {checkpoint} has no usable config (needs arch, image_size, proj_dim)"
        )
    try:
        model = build_model(cfg)
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SimclrError(f"checkpoint {checkpoint} does not match its config: {first}") from exc
    mean = [float(v) for v in (cfg.get("mean") or IMAGENET_MEAN)]
    std = [float(v) for v in (cfg.get("std") or IMAGENET_STD)]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise SimclrError(f"checkpoint {checkpoint}: mean/std must be 3 values (std > 0)")
    model.eval()  # BatchNorm → running statistics: an image's output does not depend on its batch
    encoder = ImageEncoder(model, mean, std, half=half, features_from=features_from)
    return encoder.eval(), ckpt


def resolve_exporter(exporter: str, opset: int) -> str:
    """``auto`` → dynamo from opset 18 (its lowest native opset), TorchScript for opset 17."""
    if exporter not in EXPORTERS:
        raise SimclrError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if exporter == "auto":
        return "dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript"
    return exporter


def _opset_of(proto: onnx.ModelProto) -> int:
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def export_encoder(
    encoder: ImageEncoder, image_size: int, *, opset: int = 18, exporter: str = "auto"
) -> onnx.ModelProto:
    """Trace ``encoder`` to an ONNX model with a dynamic batch axis (weights inside the proto)."""
    if opset < MIN_OPSET:
        raise SimclrError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    exporter = resolve_exporter(exporter, opset)
    # N=2, not 1: torch.export specialises size-1 dims, which would freeze the batch at 1.
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    names = {
        "input_names": [INPUT_NAME],
        "output_names": list(OUTPUT_NAMES),
        "opset_version": opset,
    }
    # Exporter deprecation/tracer chatter is silenced; the parity check is what counts.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            if exporter == "dynamo":
                batch = torch.export.Dim("N", min=1, max=65536)
                program = torch.onnx.export(
                    encoder, (example,), dynamo=True, external_data=False, verbose=False,
                    dynamic_shapes={"images": {0: batch}}, **names,
                )  # fmt: skip
                assert program is not None
                proto = program.model_proto
            else:
                buf = io.BytesIO()
                axes = {name: {0: "N"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
                torch.onnx.export(
                    encoder, (example,), buf, dynamo=False, dynamic_axes=axes, **names
                )
                proto = onnx.load_from_string(buf.getvalue())
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SimclrError(f"ONNX export ({exporter}) failed: {first}") from exc
    if _opset_of(proto) != opset:
        # dynamo silently keeps opset 18 when its down-conversion fails (it does for 17).
        raise SimclrError(
            f"the {exporter} exporter wrote opset {_opset_of(proto)}, not {opset}; "
            "use --exporter torchscript for opset 17"
        )
    # Name the batch axis the same way whichever exporter ran: "N" on input and outputs.
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    return proto


def weights_version(proto: onnx.ModelProto) -> str:
    """Content hash of every weight in the graph (initializers + Constant tensors), 16 hex chars.

    Same weights → same version, whatever the file's other bytes (producer, metadata). Names are
    included so that two tensors swapping places changes the version.
    """
    h = hashlib.sha256()

    def add(name: str, tensor: onnx.TensorProto) -> None:
        arr = numpy_helper.to_array(tensor)
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())

    for init in sorted(proto.graph.initializer, key=lambda t: t.name):
        add(init.name, init)
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    add(f"{node.output[0]}:{attr.name}", attr.t)
    return h.hexdigest()[:16]


def build_metadata(ckpt: dict[str, Any], encoder: ImageEncoder, precision: str) -> dict[str, str]:
    """The CONTRACT §3 ``simclr.*`` keys (all but model_version, which needs the final graph)."""
    cfg = ckpt["config"]
    size = int(cfg["image_size"])
    model = encoder.model
    return {
        "simclr.arch": str(cfg["arch"]),
        "simclr.image_size": str(size),
        # repr of the config's Python floats: "0.485,0.456,0.406", parseable with float().
        "simclr.mean": ",".join(repr(v) for v in encoder.mean_values),
        "simclr.std": ",".join(repr(v) for v in encoder.std_values),
        "simclr.resize": resize_policy_for(size),
        "simclr.feature_dim": str(encoder.feature_dim),
        "simclr.features_from": encoder.features_from,
        "simclr.proj_layers": str(model.proj_layers),
        "simclr.projection_dim": str(model.proj_dim),
        "simclr.train_step": str(int(ckpt["step"])),
        "simclr.stem": str(model.stem),
        "simclr.precision": precision,
    }


def set_metadata(proto: onnx.ModelProto, meta: dict[str, str]) -> onnx.ModelProto:
    """Replace the ``simclr.*`` metadata with ``meta`` and stamp ``simclr.model_version``."""
    keep = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(META_PREFIX)]
    del proto.metadata_props[:]
    version = weights_version(proto)
    if meta.get("simclr.features_from", "backbone") != "backbone":
        # Same weights, other vectors in "features": never the same version (embed refuses to
        # mix versions in one output, so the two exports cannot be mixed either).
        version = hashlib.sha256(f"{version}:{meta['simclr.features_from']}".encode()).hexdigest()[:16]  # fmt: skip
    full = {**meta, "simclr.model_version": version}
    for key, value in [*keep, *sorted(full.items())]:
        proto.metadata_props.add(key=key, value=value)
    return proto


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    opset: int = 18,
    fp16: bool = False,
    verify: bool = True,
    exporter: str = "auto",
    seed: int = 0,
    features_from: str = "backbone",
) -> dict[str, Any]:
    """Export ``checkpoint`` to ``output`` (written atomically), verifying it unless told not to.

    Returns a report: ``output``, ``metadata`` (all ``simclr.*`` keys), ``exporter``, ``opset``,
    and with ``verify`` the parity numbers under ``parity`` (see ``simclr_embed.export.verify``). On a failed
    check nothing is written at ``output`` and ``SimclrError`` is raised.
    """
    if Path(output).resolve() == Path(checkpoint).resolve():
        raise SimclrError(f"--output {output} would overwrite the checkpoint")
    encoder, ckpt = load_encoder(checkpoint, half=fp16, features_from=features_from)
    size = int(ckpt["config"]["image_size"])
    exporter = resolve_exporter(exporter, opset)
    log.info(
        "exporting %s (%s, %d px, step %s) with the %s exporter, opset %d%s",
        checkpoint,
        ckpt["config"]["arch"],
        size,
        ckpt["step"],
        exporter,
        opset,
        ", fp16" if fp16 else "",
    )
    proto = export_encoder(encoder, size, opset=opset, exporter=exporter)
    meta = build_metadata(ckpt, encoder, "fp16" if fp16 else "fp32")
    set_metadata(proto, meta)
    report: dict[str, Any] = {
        "output": str(output),
        "exporter": exporter,
        "opset": opset,
        "metadata": {p.key: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)},
    }
    with atomic_path(output) as tmp:
        onnx.save_model(proto, str(tmp))
        if verify:
            from simclr_embed.export.verify import verify_export  # onnxruntime only when checking

            reference = (
                encoder if not fp16 else load_encoder(checkpoint, features_from=features_from)[0]
            )
            report["parity"] = verify_export(tmp, reference, size, fp16=fp16, seed=seed)
    report["bytes"] = Path(output).stat().st_size
    return report
