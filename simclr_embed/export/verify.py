"""Parity checks of an exported model: ONNX checker, ONNX Runtime (CPU) vs PyTorch, batch independence.

Tolerances (stated once, used by the CLI and the tests):
- fp32: per output, min row cosine ≥ 0.99999 and max |ort - torch| ≤ 1e-3 · max(1, max |torch|).
- fp16 (vs the fp32 PyTorch model): min cosine ≥ 0.999, max abs ≤ 5e-2 · max(1, max |torch|).
- batch independence: each image run alone matches its row of the batch within the same bounds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simclr_embed.errors import SimclrError

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("features", "projection")
BATCH_SIZES = (1, 7)


@dataclass(frozen=True)
class Tolerance:
    min_cosine: float
    rel_max_abs: float  # max abs error allowed, relative to max(1, max |reference|)

    def max_abs_for(self, reference: np.ndarray) -> float:
        return self.rel_max_abs * max(1.0, float(np.abs(reference).max()))


FP32 = Tolerance(min_cosine=0.99999, rel_max_abs=1e-3)
FP16 = Tolerance(min_cosine=0.999, rel_max_abs=5e-2)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of ``a``, ``b`` ``[N, D]`` → ``[N]`` (float64)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(axis=1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    # Two all-zero rows (e.g. a dead ReLU output) are identical, not undefined.
    return np.where(
        den > 0,
        num / np.maximum(den, 1e-30),
        np.where(np.abs(a64 - b64).max(axis=1) == 0, 1.0, 0.0),
    )


def compare(out: np.ndarray, ref: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    """Max abs error and min cosine of ``out`` vs ``ref`` ``[N, D]``, and whether within ``tol``."""
    max_abs = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max())
    min_cos = float(row_cosine(out, ref).min())
    limit = tol.max_abs_for(ref)
    return {
        "max_abs": max_abs,
        "min_cosine": min_cos,
        "max_abs_limit": limit,
        "ok": bool(min_cos >= tol.min_cosine and max_abs <= limit and np.isfinite(out).all()),
    }


def cpu_session(path: str | Path) -> Any:
    """A plain ONNX Runtime session on the CPU provider (what other runtimes will see)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # hide ORT's per-node warnings; failures still raise
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def random_images(n: int, size: int, seed: int) -> np.ndarray:
    """``[n, S, S, 3]`` uint8 noise: exercises every pixel value and both extremes."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def check_parity(
    run: Callable[[np.ndarray], Sequence[np.ndarray]],
    reference: Callable[[np.ndarray], Sequence[np.ndarray]],
    size: int,
    tol: Tolerance,
    *,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare ``run`` with ``reference`` (both uint8 ``[N,S,S,3]`` → (features, projection)).

    Returns ``{"batches": {N: {output: compare(...)}}, "batch_independence": {output: ...}, "ok"}``.
    """
    result: dict[str, Any] = {
        "batches": {},
        "tolerance": {"min_cosine": tol.min_cosine, "rel_max_abs": tol.rel_max_abs},
    }
    ok = True
    largest: tuple[np.ndarray, Sequence[np.ndarray]] | None = None
    for i, n in enumerate(batch_sizes):
        images = random_images(n, size, seed + i)
        outs, refs = run(images), reference(images)
        per_output = {
            name: compare(o, r, tol) for name, o, r in zip(OUTPUT_NAMES, outs, refs, strict=True)
        }
        result["batches"][n] = per_output
        ok &= all(c["ok"] for c in per_output.values())
        if largest is None or n > len(largest[0]):
            largest = (images, outs)
    # Each image alone must give its row of the batch (BatchNorm in inference mode, no padding leak).
    assert largest is not None
    images, batch_outs = largest
    alone = [run(images[j : j + 1]) for j in range(len(images))]  # N × ([1, F], [1, P])
    independence = {}
    for k, name in enumerate(OUTPUT_NAMES):
        stacked = np.concatenate([a[k] for a in alone], axis=0)  # [N, D]
        independence[name] = compare(stacked, batch_outs[k], tol)
    result["batch_independence"] = independence
    ok &= all(c["ok"] for c in independence.values())
    result["ok"] = bool(ok)
    return result


def format_parity(result: dict[str, Any], label: str = "ORT CPU vs PyTorch") -> list[str]:
    """Human-readable lines: one per batch size and output, then batch independence."""
    lines = []
    for n, per_output in result["batches"].items():
        for name, c in per_output.items():
            lines.append(
                f"{label} N={n} {name:<10} max_abs={c['max_abs']:.3g} (limit "
                f"{c['max_abs_limit']:.3g}) min_cos={c['min_cosine']:.7f} "
                f"{'ok' if c['ok'] else 'FAIL'}"
            )
    for name, c in result["batch_independence"].items():
        lines.append(
            f"batch independence {name:<10} max_abs={c['max_abs']:.3g} "
            f"min_cos={c['min_cosine']:.7f} {'ok' if c['ok'] else 'FAIL'}"
        )
    return lines


def verify_export(
    path: str | Path, encoder: Any, size: int, *, fp16: bool = False, seed: int = 0
) -> dict[str, Any]:
    """Check the ONNX file at ``path`` against the PyTorch ``encoder`` (fp32); raise on failure.

    ``encoder``: an ``simclr_embed.export.onnx_export.ImageEncoder`` (fp32 reference even for an fp16 export).
    """
    import onnx
    import torch

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise SimclrError(
            f"ONNX checker rejected the export: {str(exc).strip().splitlines()[0]}"
        ) from exc

    def reference(images: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in encoder(torch.from_numpy(images))]

    tol = FP16 if fp16 else FP32
    try:
        session = cpu_session(path)
        session.run(None, {"images": random_images(1, size, seed)})
    except Exception as exc:
        if not fp16:
            raise SimclrError(
                f"ONNX Runtime cannot run the export: {str(exc).strip().splitlines()[0]}"
            ) from exc
        # fp16 targets GPUs; a CPU provider without a float16 kernel is not a broken model.
        msg = f"fp16 parity skipped: the CPU provider cannot run this float16 model ({type(exc).__name__})"
        log.warning(msg)
        return {"ok": True, "skipped": msg, "checker": "ok"}

    def run(images: np.ndarray) -> list[np.ndarray]:
        return session.run(list(OUTPUT_NAMES), {"images": images})

    result = check_parity(run, reference, size, tol, seed=seed)
    result["checker"] = "ok"
    for line in format_parity(result):
        log.info(line)
    if not result["ok"]:
        bad = [line for line in format_parity(result) if line.endswith("FAIL")]
        raise SimclrError(f"parity check failed: {bad[0]}")
    return result
