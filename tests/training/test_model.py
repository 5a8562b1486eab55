"""Model stems: the layer1 feature-map side they promise, and that a non-default stem exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from simclr_embed.training.model import SimCLRModel, build_model
from tests.conftest import write_checkpoint


@pytest.mark.parametrize(("stem", "side"), [("small", 32), ("medium", 16), ("standard", 8)])
def test_stem_sets_layer1_side(stem: str, side: int) -> None:
    model = build_model({"arch": "resnet18", "stem": stem, "image_size": 32, "proj_dim": 16})
    b = model.backbone
    x = torch.randn(2, 3, 32, 32)
    stem_out = b.maxpool(b.relu(b.bn1(b.conv1(x))))  # [N, 64, side, side]
    assert stem_out.shape == (2, 64, side, side)
    h, z = model.eval()(x)
    assert h.shape == (2, 512) and z.shape == (2, 16)


def test_unknown_stem_is_refused() -> None:
    with pytest.raises(ValueError, match="stem must be one of small, medium, standard"):
        SimCLRModel("resnet18", "tiny", 16)


def test_medium_stem_checkpoint_exports_with_parity(tmp_path: Path) -> None:
    import onnxruntime as ort

    from simclr_embed.export.onnx_export import export_checkpoint

    torch.manual_seed(0)
    cfg = {"arch": "resnet18", "stem": "medium", "image_size": 32, "proj_dim": 16}
    cfg |= {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    model = SimCLRModel("resnet18", "medium", 16)
    ckpt = write_checkpoint(tmp_path / "last.pt", model, cfg, step=0)
    report = export_checkpoint(ckpt, tmp_path / "m.onnx")  # runs the parity check itself
    assert report["metadata"]["simclr.stem"] == "medium"
    # Independent of the exporter's own check: uint8 NHWC in, the graph normalizes.
    img = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feats = sess.run(["features"], {sess.get_inputs()[0].name: img})[0]
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255.0
    mean, std = (
        torch.tensor(cfg["mean"]).view(1, 3, 1, 1),
        torch.tensor(cfg["std"]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        ref = model.eval().forward_features((x - mean) / std).numpy()
    np.testing.assert_allclose(feats, ref, atol=1e-3, rtol=1e-3)
