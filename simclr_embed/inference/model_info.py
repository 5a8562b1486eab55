"""What every runtime shares: a model's facts (``ModelInfo``, from its ``simclr.*`` metadata), the
``Runtime`` contract, batch buckets, and the one definition of an output vector."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from simclr_embed.errors import SimclrError
from simclr_embed.imageio import resize_policy_for

INPUT = "images"
OUTPUTS = ("features", "projection")


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about a model (from its ``simclr.*`` metadata)."""

    path: str
    model_version: str
    arch: str
    image_size: int
    feature_dim: int
    projection_dim: int
    resize: str
    train_step: int | None = None


def usable_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup CPU sets, unlike ``cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``max_batch_size`` (always included): the shapes a GPU ever sees."""
    sizes = {max_batch_size}
    b = 1
    while b < max_batch_size:
        sizes.add(b)
        b *= 2
    return tuple(sorted(sizes))


def model_info_from_metadata(
    meta: Mapping[str, str],
    path: Path,
    *,
    image_size: object = None,
    feature_dim: object = None,
    projection_dim: object = None,
) -> ModelInfo:
    """``ModelInfo`` from CONTRACT §3 ``simclr.*`` keys; the keyword values are fallbacks."""

    def number(key: str, fallback: object) -> int:
        value = meta.get(key, fallback)
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise SimclrError(f"{path}: cannot tell {key} (metadata {value!r})") from None

    size = number("simclr.image_size", image_size)
    version = meta.get("simclr.model_version")
    if not version:
        version = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    step = meta.get("simclr.train_step")
    return ModelInfo(
        path=str(path),
        model_version=version,
        arch=meta.get("simclr.arch", "unknown"),
        image_size=size,
        feature_dim=number("simclr.feature_dim", feature_dim),
        projection_dim=number("simclr.projection_dim", projection_dim),
        resize=meta.get("simclr.resize") or resize_policy_for(size),
        train_step=int(step) if step and step.lstrip("-").isdigit() else None,
    )


class Runtime(Protocol):
    """What the batcher and the servicer use of a runtime (ONNX Runtime or torch)."""

    info: ModelInfo
    providers: list[str]
    on_gpu: bool

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]: ...

    def warm_up(self) -> None: ...


def select_output(outputs: Mapping[str, np.ndarray], name: str, normalize: bool) -> np.ndarray:
    """``outputs[name]`` ``[n, D]``, L2-normalized per row when asked: the server's, offline's
    and Ray's one definition of what a vector is."""
    vectors = outputs[name]  # [n, D] float32
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # [n, 1]
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors


def pad_to_bucket(images: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    """Zero-pad ``[n, ...]`` up to the smallest bucket ≥ n (n itself beyond the largest)."""
    n = len(images)
    bucket = next((b for b in buckets if b >= n), n)
    if bucket == n:
        return np.ascontiguousarray(images)
    pad = np.zeros((bucket - n, *images.shape[1:]), images.dtype)
    return np.concatenate([images, pad])
