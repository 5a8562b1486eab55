"""``--init-weights torchvision[:NAME]`` and the SimCLRv2 head, end to end: train from
torchvision's ImageNet weights (read from torch.hub's cache — a weights file placed in a
temporary ``$TORCH_HOME``, nothing downloaded) with a 3-layer projection head, export with
``--export-features head1``, serve it, and get the first projection layer's output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from simclr_embed.client import EmbeddingClient
from simclr_embed.errors import SimclrError
from simclr_embed.export.cli import main as export_main
from simclr_embed.imageio import to_model_input
from simclr_embed.training.checkpoint import load_checkpoint
from simclr_embed.training.cli import main as train_main
from simclr_embed.training.model import (
    SimCLRModel,
    build_model,
    load_backbone_state,
    torchvision_weights,
)
from tests.server.conftest import ServerThread, photo, serve_config

HIDDEN = 48


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """A torch.hub cache holding "ImageNet weights" for resnet18 (seeded random ones, under
    the file name torchvision's URL gives), as a download would have left it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(123)
    state = torchvision.models.resnet18(weights=None).state_dict()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / Path(url).name)
    return state


def test_torchvision_weights_come_from_the_cache(torch_home: dict[str, torch.Tensor]) -> None:
    state, name = torchvision_weights("resnet18", "torchvision")  # DEFAULT = IMAGENET1K_V1 here
    assert name == "ResNet18_Weights.IMAGENET1K_V1"
    assert torch.equal(state["layer2.0.conv1.weight"], torch_home["layer2.0.conv1.weight"])
    with pytest.raises(SimclrError, match=r"no weights .IMAGENET9K.*IMAGENET1K_V1"):
        torchvision_weights("resnet18", "torchvision:IMAGENET9K")
    small = SimCLRModel("resnet18", "small", 16)  # its 3×3 conv1 cannot take the 7×7 one
    missing, unfit = load_backbone_state(small, state)
    assert unfit == ["conv1.weight"] and missing == ["conv1.weight"]
    assert torch.equal(small.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_pretrained_start_v2_head_export_serve(
    torch_home: dict[str, torch.Tensor], image_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert train_main(["--data", str(image_folder), "--out", str(out), "--device", "cpu",
                       "--arch", "resnet18", "--stem", "standard", "--image-size", "32",
                       "--init-weights", "torchvision:IMAGENET1K_V1", "--proj-layers", "3",
                       "--proj-hidden", str(HIDDEN), "--proj-dim", "16", "--batch-size", "8",
                       "--lr", "1e-6", "--max-steps", "1", "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    # Started from the cached weights: one step at lr 1e-6 leaves the trunk where it began.
    got = ckpt["model"]["backbone.layer3.0.conv1.weight"]
    assert (got - torch_home["layer3.0.conv1.weight"]).abs().max() < 1e-4
    assert ckpt["config"]["proj_layers"] == 3
    heads = [k for k in ckpt["model"] if k.startswith("projector.") and k.endswith(".weight")]
    assert len([k for k in heads if ckpt["model"][k].dim() == 2]) == 3  # three Linear layers

    onnx_path = tmp_path / "v2.onnx"
    assert export_main(["--checkpoint", str(out / "checkpoints" / "last.pt"), "--output",
                        str(onnx_path), "--export-features", "head1"]) == 0  # fmt: skip
    backbone_path = tmp_path / "backbone.onnx"
    assert export_main(["--checkpoint", str(out / "checkpoints" / "last.pt"), "--output",
                        str(backbone_path), "--no-verify"]) == 0  # fmt: skip

    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    img = photo(48, 40, seed=5)
    x = to_model_input(img, 32, "resize")  # [32, 32, 3] uint8, the served preprocessing
    t = (torch.from_numpy(x.copy()).float() / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])  # fmt: skip
    with torch.no_grad():
        h = model.forward_features(t.permute(2, 0, 1)[None])
        want_head1, want_h = model.forward_head1(h)[0].numpy(), h[0].numpy()

    versions = set()
    for path, want, dim in ((onnx_path, want_head1, HIDDEN), (backbone_path, want_h, 512)):
        server = ServerThread(serve_config(path))
        try:
            with EmbeddingClient(server.target) as client:
                info = client.model_info()
                versions.add(info["model_version"])
                (got_vec,) = client.embed([img])
        finally:
            server.close()
        assert got_vec.shape == (dim,) and info["feature_dimension"] == dim
        np.testing.assert_allclose(got_vec, want, rtol=1e-4, atol=1e-4)
    assert len(versions) == 2  # same weights, other features: never one model version
