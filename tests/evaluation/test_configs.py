"""Every recipe in configs/ loads through the real ``simclr train`` parser with the intended values."""

from __future__ import annotations

from pathlib import Path

import pytest

from simclr_embed.training.config import parse_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def load(name: str):
    return parse_config(["--config", str(CONFIGS / name), "--data", "d", "--out", "o"])


def test_every_config_file_parses() -> None:
    files = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("*.toml"))
    assert {f.name for f in files} >= {
        "cifar10-resnet18.yaml",
        "cifar10-resnet50.yaml",
        "imagenet-resnet50.yaml",
    }
    for f in files:
        cfg = load(f.name)  # an unknown key or bad value would exit 2 here
        assert cfg.data == "d" and cfg.out == "o"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "cifar10-resnet18.yaml",
            dict(
                arch="resnet18",
                image_size=32,
                stem="small",
                batch_size=512,
                epochs=800,
                temperature=0.5,
                color_strength=0.5,
                blur=False,
            ),
        ),
        (
            "finetune-imagenet.yaml",
            dict(
                arch="resnet50",
                image_size=224,
                stem="standard",  # the ImageNet weights' own stem: conv1 loads too
                init_weights="torchvision:IMAGENET1K_V2",  # a name torchvision has (checked below)
                warmup_epochs=1,
                lr=0.03,
            ),
        ),
        (
            "cifar10-resnet50.yaml",
            dict(
                arch="resnet50",
                image_size=32,
                stem="small",
                temperature=0.5,
                color_strength=0.5,
                blur=False,
            ),
        ),
        (
            "imagenet-resnet50.yaml",
            dict(
                arch="resnet50",
                image_size=224,
                stem="standard",
                optimizer="lars",
                lr=0.3,
                lr_scaling="linear",
                temperature=0.1,
                warmup_epochs=10,
                precision="bf16",
                blur=True,
                epochs=100,
            ),
        ),
    ],
)
def test_recipe_values(name: str, expected: dict) -> None:
    cfg = load(name)
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_imagenet_global_batch_is_4096_on_one_node_of_8_gpus() -> None:
    assert load("imagenet-resnet50.yaml").batch_size * 8 == 4096


def test_command_line_flags_win_over_the_file() -> None:
    cfg = parse_config(
        [
            "--config",
            str(CONFIGS / "cifar10-resnet18.yaml"),
            "--data",
            "d",
            "--out",
            "o",
            "--batch-size",
            "64",
            "--epochs",
            "3",
        ]
    )
    assert (cfg.batch_size, cfg.epochs, cfg.temperature) == (64, 3, 0.5)


def test_finetune_recipe_names_real_torchvision_weights() -> None:
    import torchvision

    name = load("finetune-imagenet.yaml").init_weights.partition(":")[2]
    assert torchvision.models.get_model_weights("resnet50")[name].meta["num_params"] > 0
