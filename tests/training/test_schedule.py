"""The resolved schedule follows the run's length; short-run hints; precision auto on the CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from simclr_embed.training.config import parse_config
from simclr_embed.training.setup import cpu_has_native_bf16, resolve_precision, resolve_run

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _resolve(config: Path, *flags: str, images: int = 50_000) -> dict:
    cfg = parse_config(["--config", str(config), "--data", "d", "--out", "o", *flags])
    spe = images // cfg.batch_size
    return resolve_run(cfg, num_images=images, steps_per_epoch=spe, world=1,
                       device=torch.device("cpu"), amp_dtype=None)  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_warmup_is_the_same_fraction_of_any_run(config: Path) -> None:
    full = _resolve(config)
    spe, epochs, warm = full["steps_per_epoch"], full["epochs"], full["warmup_epochs"]
    assert full["total_steps"] == epochs * spe
    assert full["warmup_steps"] == round(epochs * spe * warm / epochs)  # = warmup_epochs × spe
    short = _resolve(config, "--max-steps", "800")
    assert short["total_steps"] == 800
    assert short["warmup_steps"] == round(800 * warm / epochs)  # not warmup_epochs × spe
    assert short["warmup_steps"] <= 800 / 5
    explicit = _resolve(config, "--max-steps", "800", "--warmup-steps", "40")
    assert explicit["warmup_steps"] == 40


def test_cifar_recipe_cut_short_no_longer_warms_up_for_half_the_run() -> None:
    # The run: 10 warm-up epochs of a 800-epoch recipe, cut to 800 steps of batch 128 on
    # 5,000 images (39 steps/epoch): 390 warm-up steps before; now 1.25 % of 800.
    r = _resolve(ROOT / "configs/cifar10-resnet18.yaml", "--batch-size", "128", "--max-steps", "800", images=5_000)  # fmt: skip
    assert r["steps_per_epoch"] == 39 and r["warmup_steps"] == 10


def test_hints_for_short_runs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    _resolve(ROOT / "configs/cifar10-resnet18.yaml", "--max-steps", "800")
    assert "temperature 0.5" in caplog.text and "cpu-quick.yaml" in caplog.text
    caplog.clear()
    _resolve(ROOT / "configs/cpu-quick.yaml", "--max-steps", "800")  # T 0.2: nothing to say
    assert "temperature" not in caplog.text
    _resolve(ROOT / "configs/cpu-quick.yaml", "--max-steps", "800", "--warmup-steps", "400")
    assert "warm-up is 400 of 800 steps" in caplog.text


def test_precision_auto_on_the_cpu() -> None:
    amp, scaler = resolve_precision("auto", torch.device("cpu"))
    assert amp == (torch.bfloat16 if cpu_has_native_bf16() else None) and scaler is False
    assert resolve_precision("fp32", torch.device("cpu")) == (None, False)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if flags:  # torch's answer agrees with the CPU's own flags
        assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
