"""The --eval-data kNN monitor: bank/query split, eval preprocessing, bad images skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from simclr_embed.errors import SimclrError
from simclr_embed.imageio import IMAGENET_MEAN, IMAGENET_STD
from simclr_embed.training.model import SimCLRModel
from simclr_embed.training.monitor import extract_features, knn_monitor, load_eval_sets
from tests.conftest import write_image_folder


def test_flat_folder_is_split_every_fourth_image_per_class(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=8)
    bank, queries, k = load_eval_sets(tmp_path, 32)
    assert k == 3 and len(bank) == 18 and len(queries) == 6
    assert not set(bank.paths) & set(queries.paths)
    assert sorted(queries.labels) == [0, 0, 1, 1, 2, 2]
    assert all(p.name in ("0003.png", "0007.png") for p in queries.paths)


def test_train_val_subfolders_are_used_as_bank_and_queries(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", per_class=3)
    write_image_folder(tmp_path / "val", per_class=2, seed=1)
    bank, queries, k = load_eval_sets(tmp_path, 32)
    assert (len(bank), len(queries), k) == (9, 6, 3)
    write_image_folder(tmp_path / "val", per_class=1, classes=("extra",))
    with pytest.raises(SimclrError, match="different classes"):
        load_eval_sets(tmp_path, 32)


def test_bad_eval_folders(tmp_path: Path) -> None:
    with pytest.raises(SimclrError, match="--eval-data"):
        load_eval_sets(tmp_path / "missing", 32)
    write_image_folder(tmp_path / "flat", per_class=2, classes=("only",))
    with pytest.raises(SimclrError, match="--eval-data"):
        load_eval_sets(tmp_path / "flat", 32)  # a single class


def test_features_match_manual_preprocessing_and_skip_bad_files(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=4, size=40)
    (tmp_path / "circle" / "zz_bad.png").write_bytes(b"broken")
    bank, _, _ = load_eval_sets(tmp_path, 32)
    torch.manual_seed(0)
    model = SimCLRModel("resnet18", "standard", 16).eval()
    feats, labels = extract_features(
        model, bank, torch.device("cpu"), IMAGENET_MEAN, IMAGENET_STD, batch_size=5
    )
    good = [i for i, p in enumerate(bank.paths) if p.name != "zz_bad.png"]
    assert feats.shape == (len(good), 512) and labels.tolist() == [bank.labels[i] for i in good]
    # independent reference for one image: PIL resize to 32×32 (policy "resize"), /255, normalize
    from PIL import Image

    with Image.open(bank.paths[0]) as im:
        arr = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        ref = model.forward_features(x[None])[0]
    torch.testing.assert_close(feats[0], ref, atol=1e-4, rtol=1e-4)


def test_knn_monitor_returns_a_fraction_and_keeps_the_mode(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=8)
    bank, queries, k = load_eval_sets(tmp_path, 32)
    model = SimCLRModel("resnet18", "standard", 16).eval()
    top1 = knn_monitor(model, bank, queries, k, torch.device("cpu"), IMAGENET_MEAN, IMAGENET_STD)
    assert 0.0 <= top1 <= 1.0 and top1 * len(queries) == pytest.approx(round(top1 * len(queries)))
    assert not model.training
    model.train()
    knn_monitor(model, bank, queries, k, torch.device("cpu"), IMAGENET_MEAN, IMAGENET_STD)
    assert model.training  # the training loop's mode is restored
