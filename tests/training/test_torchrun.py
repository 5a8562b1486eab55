"""`torchrun --nproc-per-node 2 -m simclr_embed.training ... --device cpu`: two real gloo processes, DDP,
SyncBatchNorm, negatives gathered across ranks; rank 0 alone writes files and logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simclr_embed.training.checkpoint import load_checkpoint
from tests.conftest import write_image_folder

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_torchrun_two_processes_cpu(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", per_class=8)  # 24 images, all used per epoch
    (data / "square" / "0003.png").write_bytes(b"\x89PNG broken")  # one rank will meet it
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "simclr_embed.training",
        "--data",
        str(data),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--arch",
        "resnet18",
        "--image-size",
        "32",
        "--stem",
        "standard",
        "--proj-dim",
        "16",
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--checkpoint-every",
        "2",
        "--keep-checkpoints",
        "1",
        "--workers",
        "0",
        "--log-every",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]

    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step-4.pt"]
    ckpt = load_checkpoint(ckpts / "last.pt")
    assert ckpt["step"] == 4 and ckpt["config"]["world_size"] == 2
    assert ckpt["config"]["global_batch_size"] == 8 and ckpt["config"]["steps_per_epoch"] == 3
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    # rank 0 alone writes: one TensorBoard event file, one start-up log line, no stray temp files
    assert len(list((out / "tb").iterdir())) == 1
    assert log.count("training resnet18") == 1, log[-3000:]
    assert log.count("step 4/4") == 1
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # whichever rank met the broken file, rank 0 reports it once and counts it
    assert log.count("skipping unreadable image") == 1 and "0003.png" in log, log[-3000:]
    assert "1 unreadable image file(s) skipped" in log
