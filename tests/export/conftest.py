"""Export fixtures: the tiny checkpoint exported once (verified), a resnet50 checkpoint, and an
independent PyTorch reference (plain torchvision normalize, not the exporter's wrapper)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from simclr_embed.training.model import SimCLRModel, build_model
from tests.conftest import write_checkpoint


def torch_reference(checkpoint: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[N, S, S, 3]`` → (features ``[N, F]``, projection ``[N, P]``) straight from the
    checkpoint: the preprocessing a reader of CONTRACT §3 would write, independent of export/."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, S, S] in [0, 1]
    x = TF.normalize(
        x,
        mean=list(cfg.get("mean") or (0.485, 0.456, 0.406)),
        std=list(cfg.get("std") or (0.229, 0.224, 0.225)),
    )
    with torch.no_grad():
        h = model.forward_features(x)
        return h.numpy(), model.forward_head(h).numpy()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def uint8_images(n: int, size: int, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def exported_tiny(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    """The tiny checkpoint through the default path (dynamo, opset 18, verified): (file, report)."""
    from simclr_embed.export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    return out, export_checkpoint(tiny_checkpoint, out)


@pytest.fixture(scope="session")
def r50_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real resnet50 (small stem, 64 px, 128-d head) whose BatchNorm statistics were moved by
    train-mode forward passes, so eval-mode export bugs (batch statistics) would show."""
    torch.manual_seed(1)
    cfg = {
        "arch": "resnet50",
        "stem": "small",
        "image_size": 64,
        "proj_dim": 128,
        "mean": [0.5, 0.45, 0.4],
        "std": [0.25, 0.24, 0.26],
    }
    model = SimCLRModel(cfg["arch"], cfg["stem"], cfg["proj_dim"]).train()
    with torch.no_grad():
        model(torch.rand(4, 3, 64, 64) * 2 - 0.5)
    return write_checkpoint(tmp_path_factory.mktemp("r50") / "last.pt", model, cfg, step=2)
