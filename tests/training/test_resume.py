"""Exact resume: k steps, stop, --resume → the same weights as one uninterrupted run.

The stop lands mid-epoch, so the resumed run must skip exactly the batches already consumed and
see the same augmentations (per-sample seeds), with any number of workers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simclr_embed.errors import run_main
from simclr_embed.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from simclr_embed.training.cli import main
from tests.conftest import write_image_folder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("resume") / "data", per_class=8)  # 24 images


def _argv(data: Path, out: Path, workers: int, *extra: str) -> list[str]:
    # 24 images / batch 8 → 3 steps per epoch; 8 steps = 2 epochs + 2 steps. LARS (the default)
    # with momentum, warmup + cosine: every piece of optimizer/scheduler state matters.
    return [
        "--data",
        str(data),
        "--out",
        str(out),
        "--arch",
        "resnet18",
        "--image-size",
        "32",
        "--stem",
        "standard",
        "--proj-dim",
        "16",
        "--batch-size",
        "8",
        "--max-steps",
        "8",
        "--warmup-steps",
        "3",
        "--lr",
        "2.0",
        "--color-strength",
        "0.5",
        "--workers",
        str(workers),
        "--checkpoint-every",
        "100",
        "--no-progress",
        "--seed",
        "3",
        *extra,
    ]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight(one_torch_thread: None, data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted reference run (workers=0; the views do not depend on the worker count)."""
    out = tmp_path_factory.mktemp("straight")
    assert run_main(main, _argv(data, out, 0)) == 0
    return load_checkpoint(out / "checkpoints" / "last.pt")


@pytest.mark.parametrize("workers", [0, 2])
def test_stopped_and_resumed_run_matches_uninterrupted(
    data: Path, straight: dict, tmp_path: Path, workers: int
) -> None:
    out = tmp_path / "resumed"
    assert run_main(main, _argv(data, out, workers, "--stop-after-steps", "4")) == 0
    middle = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (middle["step"], middle["epoch"], middle["batch_in_epoch"]) == (4, 1, 1)  # mid-epoch
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step-4.pt"]
    assert run_main(main, _argv(data, out, workers, "--resume")) == 0
    resumed = load_checkpoint(out / "checkpoints" / "last.pt")

    assert resumed["step"] == straight["step"] == 8
    # A different model after 4 steps: the test can tell runs apart.
    assert not torch.equal(
        middle["model"]["projector.3.weight"], straight["model"]["projector.3.weight"]
    )
    _assert_same(straight["model"], resumed["model"])  # weights and BN running statistics
    for pid, state in straight["optimizer"]["state"].items():
        _assert_same(state, resumed["optimizer"]["state"][pid])  # LARS momentum buffers
    assert straight["scheduler"]["last_epoch"] == resumed["scheduler"]["last_epoch"] == 8


def test_save_checkpoint_prunes_step_files_and_keeps_last(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_checkpoint(tmp_path, {"step": step, "model": {}, "config": {}}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step-4.pt", "step-5.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 5
    (tmp_path / "step-10.pt.bak").write_bytes(b"not ours")  # unrelated files are left alone
    save_checkpoint(tmp_path, {"step": 6, "model": {}, "config": {}}, keep=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step-10.pt.bak"]
    # a payload that cannot be serialized leaves the previous last.pt untouched
    with pytest.raises(Exception):  # noqa: B017 - torch/pickle raise various types
        save_checkpoint(tmp_path, {"step": 7, "model": {}, "config": {}, "bad": lambda: 0}, keep=1)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 6
    assert not list(tmp_path.glob(".*.tmp"))


def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    import random

    import numpy as np

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint(
        tmp_path, {"step": 1, "model": {}, "config": {}, "rng": capture_rng_state()}, keep=0
    )
    expected = (random.random(), np.random.standard_normal(), torch.rand(2))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "last.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.standard_normal(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


@pytest.fixture(scope="module")
def straight_device(
    one_torch_thread: None, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    out = tmp_path_factory.mktemp("straight-device")
    assert run_main(main, _argv(data, out, 0, "--augment-on", "device")) == 0
    return load_checkpoint(out / "checkpoints" / "last.pt")


def test_device_augmentation_resumes_exactly(
    data: Path, straight: dict, straight_device: dict, tmp_path: Path
) -> None:
    """--augment-on device draws its parameters from (seed, step, rank): a stopped and resumed
    run sees the same views as an uninterrupted one."""
    out = tmp_path / "resumed"
    extra = ("--augment-on", "device")
    assert run_main(main, _argv(data, out, 2, "--stop-after-steps", "4", *extra)) == 0
    assert run_main(main, _argv(data, out, 2, "--resume", *extra)) == 0
    resumed = load_checkpoint(out / "checkpoints" / "last.pt")
    assert resumed["config"]["augment_on"] == "device"
    _assert_same(straight_device["model"], resumed["model"])
    # Really the other path: other random draws than the workers' path, other weights.
    assert not torch.equal(
        straight["model"]["projector.3.weight"], straight_device["model"]["projector.3.weight"]
    )
