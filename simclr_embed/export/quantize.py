"""int8 quantization of an exported fp32 model with ONNX Runtime, for CPU serving.

Two modes (bench/export.py, resnet50 at 224 px, 2-core CPU; see docs/benchmarks.md):
- ``static``: QDQ, per-channel int8 weights, uint8 activations calibrated (MinMax) on real images
  brought to S×S by the model's own ``simclr.resize`` policy. ~2.8× the fp32 images/s.
- ``dynamic`` (no calibration data): only MatMul/Gemm (the projection head) are quantized, so it
  is about as fast as fp32. Dynamically quantized Conv makes ResNets *slower* than fp32 on ORT's
  CPU provider (``ConvInteger`` has no fast kernel; seen in development: resnet50 at 64 px,
  batch 8, ~0.8 vs ~5.5 img/s), so it is not offered.

The result is checked against the fp32 model on held-out images (cosine per row) and the speed of
both is measured side by side in the same process, so the trade is visible in one report.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from simclr_embed.errors import SimclrError
from simclr_embed.export.onnx_export import META_PREFIX, set_metadata
from simclr_embed.export.verify import OUTPUT_NAMES, cpu_session, random_images, row_cosine
from simclr_embed.fileio import atomic_path
from simclr_embed.imageio import list_images, open_image, to_model_input

log = logging.getLogger(__name__)

# int8 is lossy by design: a row may drift, the bulk must not. Checked on held-out images.
INT8_MIN_COSINE = 0.90  # every row, both outputs
INT8_MEAN_FEATURE_COSINE = 0.98  # mean over rows, features
MAX_HELD = 16
CALIBRATION_BATCH = 8


def load_calibration_images(folder: Path, size: int, policy: str, limit: int) -> np.ndarray:
    """Up to ``limit`` images under ``folder`` as uint8 ``[n, S, S, 3]`` (unreadable files skipped)."""
    if not folder.is_dir():
        raise SimclrError(f"calibration folder not found: {folder}")
    paths = list_images(folder)
    arrays = []
    for path in paths:
        if len(arrays) >= limit:
            break
        try:
            arrays.append(to_model_input(open_image(path, draft_size=size), size, policy))
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            log.warning("skipping unreadable calibration image %s: %s", path, exc)
    if not arrays:
        raise SimclrError(f"no readable images in calibration folder {folder}")
    return np.stack(arrays)  # [n, S, S, 3]


class _Reader:
    """ORT ``CalibrationDataReader``: yields ``{"images": uint8 [b, S, S, 3]}`` batches."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches = iter(
            [images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"images": batch}


def images_per_second(
    sessions: dict[str, Any], batch: np.ndarray, *, budget_s: float = 8.0, max_reps: int = 10
) -> dict[str, float]:
    """Images/s of each session on ``batch``, runs interleaved so load changes hit all alike."""
    for s in sessions.values():
        s.run(None, {"images": batch})  # warm-up: first run allocates and picks kernels
    spent = dict.fromkeys(sessions, 0.0)
    reps = 0
    deadline = time.monotonic() + budget_s
    while reps < max_reps and (reps < 2 or time.monotonic() < deadline):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"images": batch})
            spent[name] += time.perf_counter() - t0
        reps += 1
    return {name: reps * len(batch) / t for name, t in spent.items()}


def quantize_model(
    fp32_path: str | Path,
    output: str | Path,
    *,
    mode: str = "auto",
    calibration_data: str | Path | None = None,
    calibration_images: int = 64,
    verify: bool = True,
    measure_speed: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Quantize the fp32 ONNX model at ``fp32_path`` to int8 at ``output`` (atomic); return a report.

    ``mode``: ``static`` (needs ``calibration_data``), ``dynamic``, or ``auto`` (static when
    calibration data is given). With ``verify`` the int8 outputs must stay within the cosine
    bounds above on held-out images, or ``SimclrError`` is raised and nothing is written.
    """
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    fp32_path = Path(fp32_path)
    meta = {
        p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props
    }
    size, policy = int(meta["simclr.image_size"]), meta["simclr.resize"]
    if mode == "auto":
        mode = "static" if calibration_data is not None else "dynamic"
    if mode == "static" and calibration_data is None:
        raise SimclrError("static int8 quantization needs --calibration-data")

    # Held-out images judge the result: real ones when given (never used for calibration), else noise.
    if calibration_data is not None:
        images = load_calibration_images(
            Path(calibration_data), size, policy, calibration_images + MAX_HELD
        )
        n_held = min(MAX_HELD, len(images) // 4)
        calib, held = (images[n_held:], images[:n_held]) if n_held else (images, images)
        held_source = (
            "held-out calibration-folder images"
            if n_held
            else "the calibration images (too few to hold out)"
        )
        calib = calib[:calibration_images]
    else:
        calib, held = None, random_images(MAX_HELD, size, seed)
        held_source = "random uint8 images"

    with tempfile.TemporaryDirectory(prefix="simclr-int8-") as scratch:
        # Shape inference + ORT graph optimizations (BatchNorm folded into Conv) before quantizing,
        # as ORT recommends; otherwise BN stays a float op between quantized convs.
        pre = Path(scratch) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        raw = Path(scratch) / "int8.onnx"
        if mode == "static":
            log.info("static int8 calibration on %d images", len(calib))
            quantize_static(
                str(pre),
                str(raw),
                _Reader(calib),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
            scheme = "static-qdq-per-channel"
        else:
            quantize_dynamic(
                str(pre),
                str(raw),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
            scheme = "dynamic-matmul"
        proto = onnx.load(str(raw))

    # Same simclr.* keys as the fp32 model; precision and version follow the int8 weights.
    base = {
        k: v for k, v in meta.items() if k.startswith(META_PREFIX) and k != "simclr.model_version"
    }
    set_metadata(proto, {**base, "simclr.precision": "int8", "simclr.quantization": scheme})
    report: dict[str, Any] = {
        "mode": mode,
        "scheme": scheme,
        "held_images": len(held),
        "held_source": held_source,
        "calibration_images": 0 if calib is None else len(calib),
    }
    with atomic_path(output) as tmp:
        onnx.save_model(proto, str(tmp))
        fp32, int8 = cpu_session(fp32_path), cpu_session(tmp)
        ref = fp32.run(list(OUTPUT_NAMES), {"images": held})
        out = int8.run(list(OUTPUT_NAMES), {"images": held})
        cos = {name: row_cosine(o, r) for name, o, r in zip(OUTPUT_NAMES, out, ref, strict=True)}
        report["min_cosine"] = {k: float(v.min()) for k, v in cos.items()}
        report["mean_cosine"] = {k: float(v.mean()) for k, v in cos.items()}
        ok = (
            min(report["min_cosine"].values()) >= INT8_MIN_COSINE
            and report["mean_cosine"]["features"] >= INT8_MEAN_FEATURE_COSINE
        )
        report["ok"] = bool(ok)
        if measure_speed:
            batch = np.resize(held, (8, size, size, 3))  # [8, S, S, 3], held images repeated
            ips = images_per_second({"fp32": fp32, "int8": int8}, batch)
            report["speed"] = {
                "batch": 8,
                "fp32_images_per_s": ips["fp32"],
                "int8_images_per_s": ips["int8"],
                "speedup": ips["int8"] / ips["fp32"],
            }
        if verify:
            onnx.checker.check_model(str(tmp), full_check=True)
            if not ok:
                raise SimclrError(
                    f"int8 model too far from fp32 on {held_source}: min cosine "
                    f"{min(report['min_cosine'].values()):.4f} (need ≥ {INT8_MIN_COSINE}), mean "
                    f"feature cosine {report['mean_cosine']['features']:.4f} "
                    f"(need ≥ {INT8_MEAN_FEATURE_COSINE})"
                )
        del fp32, int8  # close the sessions before the rename (Windows keeps files open)
    report["metadata"] = {
        p.key: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)
    }
    return report
