"""Shared fixtures: real image files on disk, a tiny real checkpoint, a tiny real ONNX model.

Everything is generated here (no downloads, nothing from ../shared).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "stripes")


def draw_sample(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of a class with a learnable structure: the shape is the class, colours vary."""
    bg = tuple(int(c) for c in rng.integers(0, 256, 3))
    fg = tuple(int(c) for c in rng.integers(0, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    s = size
    jitter = int(rng.integers(-s // 8, s // 8 + 1))
    if kind == "circle":
        d.ellipse(
            (s // 4 + jitter, s // 4 + jitter, 3 * s // 4 + jitter, 3 * s // 4 + jitter), fill=fg
        )
    elif kind == "square":
        d.rectangle(
            (s // 4 + jitter, s // 4 + jitter, 3 * s // 4 + jitter, 3 * s // 4 + jitter), fill=fg
        )
    else:
        step = max(2, s // 8)
        for x in range(0, s, 2 * step):
            d.rectangle((x, 0, x + step - 1, s), fill=fg)
    return img


def write_image_folder(
    root: Path,
    *,
    per_class: int = 8,
    size: int = 32,
    ext: str = "png",
    classes: tuple[str, ...] = CLASSES,
    seed: int = 0,
) -> Path:
    """``root/<class>/<i>.<ext>`` with ``per_class`` images per class; returns ``root``."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_sample(cls, size, rng).save(root / cls / f"{i:04d}.{ext}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labeled folder (3 classes × 8 PNG images, 32 px)."""
    return write_image_folder(tmp_path_factory.mktemp("images"))


def write_checkpoint(path: Path, model: Any, cfg: dict[str, Any], step: int) -> Path:
    """A v1 checkpoint of ``model`` (a SimCLRModel) as ``simclr train`` writes it."""
    import torch

    from simclr_embed.training.checkpoint import FORMAT

    torch.save(
        {"format": FORMAT, "model": model.state_dict(), "config": cfg, "step": step, "epoch": 0},
        path,
    )
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real v1 checkpoint of an untrained resnet18 at 32 px (standard stem, 32-d projection).

    BatchNorm running statistics are moved off their init values by a few forward passes in
    train mode, so that eval-mode outputs differ from train-mode ones (catches export bugs).
    """
    import torch

    from simclr_embed.training.model import SimCLRModel

    torch.manual_seed(0)
    cfg = {
        "arch": "resnet18",
        "stem": "standard",
        "image_size": 32,
        "proj_dim": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    model = SimCLRModel(cfg["arch"], cfg["stem"], cfg["proj_dim"])
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32) * 0.5 + 0.2)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pt", model, cfg, step=3)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported to ONNX by the real exporter (no parity check, for speed)."""
    from simclr_embed.export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_checkpoint(tiny_checkpoint, out, verify=False)
    return out
