"""One preprocessing for every model kind: checkpoint (PyTorch) and ONNX give the same features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_embed.errors import SimclrError
from simclr_embed.evaluation.features import (
    OnnxEmbedder,
    PixelEmbedder,
    TorchEmbedder,
    embed_paths,
    load_uint8,
    normalize_uint8,
)
from simclr_embed.imageio import list_images


def test_checkpoint_and_onnx_give_the_same_features(
    tiny_checkpoint: Path, tiny_onnx: Path, image_folder: Path
) -> None:
    paths = list_images(image_folder)
    torch_emb = TorchEmbedder(tiny_checkpoint, torch.device("cpu"))
    onnx_emb = OnnxEmbedder(tiny_onnx, "cpu")
    assert (onnx_emb.image_size, onnx_emb.resize) == (torch_emb.image_size, torch_emb.resize)
    # Odd batch size: the last batch is partial, order must be kept.
    a, _ = embed_paths(torch_emb, paths, batch_size=5, workers=2)
    b, _ = embed_paths(onnx_emb, paths, batch_size=7, workers=1)
    assert a.shape == b.shape == (len(paths), 512)
    assert np.abs(a - b).max() < 1e-4 * max(1.0, float(np.abs(a).max()))
    # Row i is image i: embedding one image alone gives the same row.
    single, _ = embed_paths(torch_emb, [paths[9]], batch_size=1)
    np.testing.assert_allclose(single[0], a[9], rtol=1e-4, atol=1e-5)


def test_normalize_matches_the_formula() -> None:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    got = normalize_uint8(torch.from_numpy(batch), mean, std)
    assert got.shape == (2, 3, 4, 5)
    for c in range(3):
        expected = (batch[..., c].astype(np.float64) / 255 - mean[c]) / std[c]
        np.testing.assert_allclose(got[:, c].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_load_uint8_resizes_with_the_policy(tmp_path: Path) -> None:
    # A 200×100 JPEG, centre-cropped to 64 (shorter side 73, then crop): the left and right
    # thirds (red, blue) are cropped away, the green middle remains.
    arr = np.zeros((100, 200, 3), dtype=np.uint8)
    arr[:, :66, 0] = 255
    arr[:, 66:134, 1] = 255
    arr[:, 134:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "wide.jpg", quality=95)
    out = load_uint8(tmp_path / "wide.jpg", 64, "shorter-side-crop:0.875")
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[:, 16:48, 1].mean() > 200 and out[:, 16:48, 0].mean() < 40
    assert load_uint8(tmp_path / "wide.jpg", 8, "resize").shape == (8, 8, 3)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(SimclrError, match=r"broken\.png"):
        embed_paths(PixelEmbedder(8), [bad])


def test_pixel_features_are_the_normalized_input(image_folder: Path) -> None:
    paths = list_images(image_folder)[:3]
    feats, _ = embed_paths(PixelEmbedder(16), paths)
    assert feats.shape == (3, 3 * 16 * 16)
    x = normalize_uint8(
        torch.from_numpy(load_uint8(paths[1], 16, "resize"))[None],
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    )
    np.testing.assert_allclose(feats[1], x.flatten().numpy(), rtol=1e-6)


def test_onnx_without_simclr_metadata_is_rejected(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["features"], to=TensorProto.FLOAT)],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 4, 4, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4, 4, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "plain.onnx")
    with pytest.raises(SimclrError, match=r"simclr.image_size"):
        OnnxEmbedder(tmp_path / "plain.onnx", "cpu")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(SimclrError, match="cannot load ONNX model"):
        OnnxEmbedder(tmp_path / "junk.onnx", "cpu")
