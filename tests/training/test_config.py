"""`simclr train` configuration: CONTRACT defaults, YAML/TOML defaults, flags win, exit 2 on bad usage."""

from __future__ import annotations

from pathlib import Path

import pytest

from simclr_embed.training.config import ARCHS, TrainConfig, get_args_parser, parse_config

REQ = ["--data", "d", "--out", "o"]


def _exit_code_and_err(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    return int(exc.value.code), capsys.readouterr().err


def test_contract_defaults() -> None:
    cfg = parse_config(REQ)
    assert (cfg.arch, cfg.image_size, cfg.batch_size, cfg.epochs, cfg.max_steps) == (
        "resnet50",
        224,
        256,
        100,
        None,
    )
    assert (cfg.lr, cfg.lr_scaling, cfg.optimizer, cfg.weight_decay) == (
        0.3,
        "linear",
        "lars",
        1e-6,
    )
    assert (cfg.warmup_epochs, cfg.temperature, cfg.proj_dim, cfg.seed) == (10, 0.1, 128, 0)
    assert (cfg.device, cfg.precision, cfg.resume, cfg.compile, cfg.eval_data) == (
        "auto",
        "auto",
        "no",
        False,
        None,
    )
    assert cfg.stem == "standard" and cfg.blur is True and cfg.color_strength == 1.0


@pytest.mark.parametrize(
    ("size", "stem", "blur"), [(32, "small", False), (64, "small", False), (96, "standard", True)]
)
def test_stem_and_blur_default_by_size(size: int, stem: str, blur: bool) -> None:
    cfg = parse_config([*REQ, "--image-size", str(size)])
    assert cfg.stem == stem and cfg.blur is blur
    explicit = parse_config([*REQ, "--image-size", str(size), "--stem", "standard", "--no-blur"])
    assert explicit.stem == "standard" and explicit.blur is False


def test_yaml_defaults_and_flags_win(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text(
        "data: /imgs\nout: /runs/x\narch: resnet18\nimage-size: 32\nbatch_size: 64\n"
        "lr: 0.5\ncompile: true\nresume: true\noptimizer: adamw\nmax_steps: null\n"
    )
    cfg = parse_config(["--config", str(f), "--batch-size", "8", "--no-compile"])
    assert (cfg.data, cfg.out, cfg.arch, cfg.image_size, cfg.stem) == (
        "/imgs",
        "/runs/x",
        "resnet18",
        32,
        "small",
    )
    assert cfg.batch_size == 8 and cfg.compile is False  # flags win
    assert (
        cfg.lr == 0.5 and cfg.resume == "yes" and cfg.optimizer == "adamw" and cfg.max_steps is None
    )


def test_toml_defaults(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text(
        'data = "/imgs"\nout = "/o"\nepochs = 3\ntemperature = 0.5\nstem = "standard"\nprogress = false\n'
    )
    cfg = parse_config(["--config", str(f), "--epochs", "4"])
    assert (cfg.epochs, cfg.temperature, cfg.stem, cfg.progress) == (4, 0.5, "standard", False)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--lr", "0"], "--lr"),
        (["--lr", "abc"], "--lr"),
        (["--temperature", "-0.1"], "--temperature"),
        (["--batch-size", "1"], "--batch-size"),
        (["--image-size", "8"], "--image-size"),
        (["--max-steps", "0"], "--max-steps"),
        (["--workers", "-1"], "--workers"),
        (["--checkpoint-every", "0"], "--checkpoint-every"),
        (["--keep-checkpoints", "-2"], "--keep-checkpoints"),
        (["--color-strength", "3"], "--color-strength"),
        (["--arch", "vgg16"], "--arch"),
        (["--stem", "tiny"], "--stem"),
        (["--precision", "fp8"], "--precision"),
        (["--device", "tpu"], "--device"),
        (["--optimizer", "lamb"], "--optimizer"),
        (["--lr-scaling", "log"], "--lr-scaling"),
        (["--eval-every", "0"], "--eval-every"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _exit_code_and_err([*REQ, *argv], capsys)
    assert code == 2 and flag in err


@pytest.mark.parametrize("missing", ["--data", "--out"])
def test_required_flags(missing: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", "o"] if missing == "--data" else ["--data", "d"]
    code, err = _exit_code_and_err(argv, capsys)
    assert code == 2 and missing in err


def test_config_file_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unknown = tmp_path / "u.yaml"
    unknown.write_text("data: d\nout: o\nlearning_rate: 1\n")
    code, err = _exit_code_and_err(["--config", str(unknown)], capsys)
    assert code == 2 and "learning_rate" in err and "--config" in err
    bad_value = tmp_path / "b.toml"
    bad_value.write_text('data = "d"\nout = "o"\nlr = "fast"\n')
    code, err = _exit_code_and_err(["--config", str(bad_value)], capsys)
    assert code == 2 and "--lr" in err
    bad_bool = tmp_path / "c.yaml"
    bad_bool.write_text("compile: 3\n")
    code, err = _exit_code_and_err([*REQ, "--config", str(bad_bool)], capsys)
    assert code == 2 and "--compile" in err
    code, err = _exit_code_and_err([*REQ, "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "--config" in err
    broken = tmp_path / "x.yaml"
    broken.write_text("data: [unclosed\n")
    code, err = _exit_code_and_err(["--config", str(broken)], capsys)
    assert code == 2 and "--config" in err


def test_contract_flags_exist() -> None:
    flags = {s for a in get_args_parser()._actions for s in a.option_strings}
    contract = {
        "--data",
        "--out",
        "--arch",
        "--image-size",
        "--stem",
        "--batch-size",
        "--epochs",
        "--max-steps",
        "--lr",
        "--lr-scaling",
        "--optimizer",
        "--checkpoint-every",
        "--keep-checkpoints",
        "--weight-decay",
        "--warmup-epochs",
        "--temperature",
        "--proj-dim",
        "--workers",
        "--device",
        "--precision",
        "--seed",
        "--resume",
        "--eval-data",
        "--config",
        "--compile",
    }
    assert contract <= flags


def test_arch_list_matches_model() -> None:
    from simclr_embed.training.model import RESNETS

    assert tuple(ARCHS) == tuple(RESNETS)


def test_to_dict_is_json_ready_with_mean_std_and_resize() -> None:
    import json

    d = parse_config([*REQ, "--image-size", "32"]).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["mean"] == [0.485, 0.456, 0.406] and d["std"] == [0.229, 0.224, 0.225]
    assert d["resize"] == "resize" and d["stem"] == "small"
    assert set(TrainConfig.__dataclass_fields__) <= set(d)
