"""A tiny real end-to-end run: resnet18, 32 px, ~20 steps on generated images with structure.

Checks what a run leaves behind (checkpoints, config.json, TensorBoard events, logs) and that the
contrastive loss falls.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from simclr_embed.errors import run_main
from simclr_embed.training.checkpoint import FORMAT, load_checkpoint
from simclr_embed.training.cli import main
from simclr_embed.training.model import SimCLRModel, build_model
from simclr_embed.training.setup import cpu_has_native_bf16
from tests.conftest import write_image_folder

pytestmark = pytest.mark.slow

TINY = [
    "--arch",
    "resnet18",
    "--image-size",
    "32",
    "--stem",
    "standard",
    "--proj-dim",
    "32",
    "--no-progress",
    "--workers",
    "0",
]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors run faster on one thread, and far faster on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    data = write_image_folder(root / "data", per_class=16, seed=0)  # 48 images
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    eval_data = write_image_folder(root / "eval", per_class=8, seed=1)
    out = root / "out"
    argv = [
        *TINY,
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "16",
        "--max-steps",
        "21",
        "--optimizer",
        "adamw",
        "--lr",
        "0.05",
        "--temperature",
        "0.5",
        "--warmup-steps",
        "2",
        "--color-strength",
        "0.5",
        "--log-every",
        "1",
        "--checkpoint-every",
        "7",
        "--keep-checkpoints",
        "2",
        "--eval-data",
        str(eval_data),
        "--eval-every",
        "3",
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    handler = _ListHandler()
    logging.getLogger().addHandler(handler)
    old_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        code = run_main(main, argv)
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(old_level)
        torch.set_num_threads(before)
    return {"code": code, "out": out, "logs": handler.messages}


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_run_succeeds_and_loss_falls(run: dict) -> None:
    assert run["code"] == 0
    losses = _scalars(run["out"] / "tb")["train/loss"]
    assert len(losses) == 21
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, (first, last, losses)


def test_tensorboard_has_every_metric(run: dict) -> None:
    s = _scalars(run["out"] / "tb")
    assert {
        "train/loss",
        "train/lr",
        "train/img_per_s",
        "train/contrastive_top1",
        "eval/knn_top1",
    } <= set(s)
    assert all(0.0 <= v <= 1.0 for v in s["train/contrastive_top1"] + s["eval/knn_top1"])
    lr = s["train/lr"]
    assert lr[1] == pytest.approx(
        0.05 * 16 / 256, rel=1e-4
    )  # warmup done after 2 steps; linear scaling
    assert lr[-1] == pytest.approx(0.0, abs=1e-12)  # cosine reaches 0 at the last step
    assert len(s["eval/knn_top1"]) == 3  # epochs 3 and 6, and the end (step 21 = epoch 7)


def test_checkpoints_written_pruned_and_complete(run: dict) -> None:
    ckpts = run["out"] / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step-14.pt", "step-21.pt"]
    raw = torch.load(ckpts / "last.pt", map_location="cpu", weights_only=True)
    ckpt = load_checkpoint(ckpts / "last.pt")
    assert (
        ckpt["format"] == FORMAT
        and raw["step"] == 21
        and ckpt["epoch"] == 7
        and ckpt["batch_in_epoch"] == 0
    )
    assert {"optimizer", "scheduler", "scaler", "rng", "sampler"} <= set(ckpt)
    assert {"torch", "numpy", "python", "cuda"} <= set(ckpt["rng"])
    cfg = ckpt["config"]
    assert cfg["stem"] == "standard" and cfg["arch"] == "resnet18" and cfg["image_size"] == 32
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["std"] == [0.229, 0.224, 0.225]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])  # strict: same keys as a fresh SimCLRModel
    assert isinstance(model, SimCLRModel) and model.proj_dim == 32
    assert torch.load(ckpts / "step-14.pt", weights_only=True)["step"] == 14
    assert not list(ckpts.glob(".*.tmp"))  # no temp files left behind


def test_config_json_is_the_resolved_config(run: dict) -> None:
    cfg = json.loads((run["out"] / "config.json").read_text())
    assert cfg["world_size"] == 1 and cfg["global_batch_size"] == 16 and cfg["total_steps"] == 21
    assert cfg["steps_per_epoch"] == 3 and cfg["num_images"] == 49 and cfg["warmup_steps"] == 2
    assert cfg["peak_lr"] == pytest.approx(0.05 * 16 / 256)
    # --precision auto: bf16 autocast on a CPU with native bf16, else fp32 (recorded either way)
    want = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert cfg["stem"] == "standard" and cfg["blur"] is False and cfg["amp_dtype"] == want
    assert cfg == load_checkpoint(run["out"] / "checkpoints" / "last.pt")["config"]


def test_bad_file_warned_once_and_counted(run: dict) -> None:
    warnings = [
        m for m in run["logs"] if m.startswith("skipping unreadable image") and "broken.jpg" in m
    ]
    assert len(warnings) == 1
    assert any("1 unreadable image file(s) skipped" in m for m in run["logs"])
    assert any("kNN top-1" in m for m in run["logs"])


def test_existing_run_is_not_overwritten(run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    before = (run["out"] / "checkpoints" / "last.pt").read_bytes()
    code = run_main(
        main,
        [
            *TINY,
            "--data",
            str(run["out"].parent / "data"),
            "--out",
            str(run["out"]),
            "--max-steps",
            "1",
        ],
    )
    assert code == 1 and "--resume" in capsys.readouterr().err
    assert (run["out"] / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_of_a_finished_run_is_a_no_op(run: dict, one_thread: None) -> None:
    ckpt = run["out"] / "checkpoints" / "last.pt"
    before = ckpt.stat().st_mtime_ns
    data = run["out"].parent / "data"
    code = run_main(
        main,
        [
            *TINY,
            "--data",
            str(data),
            "--out",
            str(run["out"]),
            "--batch-size",
            "16",
            "--max-steps",
            "21",
            "--resume",
            "--optimizer",
            "adamw",
            "--lr",
            "0.05",
            "--temperature",
            "0.5",
            "--warmup-steps",
            "2",
            "--color-strength",
            "0.5",
        ],
    )
    assert code == 0 and ckpt.stat().st_mtime_ns == before


def test_bf16_autocast_on_cpu(tmp_path: Path, one_thread: None) -> None:
    """``--precision bf16`` on CPU (what bench/quality.py uses on AVX512-BF16 machines): bf16
    compute, float32 master weights in the checkpoint, a finite loss."""
    data = write_image_folder(tmp_path / "data", per_class=8, seed=0)
    out = tmp_path / "out"
    argv = [*TINY, "--data", str(data), "--out", str(out), "--batch-size", "8"]
    argv += ["--max-steps", "3", "--precision", "bf16", "--device", "cpu", "--log-every", "1"]
    assert run_main(main, argv) == 0
    assert json.loads((out / "config.json").read_text())["amp_dtype"] == "bfloat16"
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    losses = _scalars(out / "tb")["train/loss"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
