"""``simclr export-onnx`` / ``python -m simclr_embed.export``: exit codes, one-line errors, end to end from a
checkpoint written by the real trainer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from simclr_embed import cli as simclr_cli
from simclr_embed.errors import run_main
from simclr_embed.export.cli import main
from simclr_embed.training.checkpoint import FORMAT

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run_main(main, argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(bytes(range(256)) * 8)
    no_marker = tmp_path / "plain.pt"
    torch.save({"model": {}, "step": 1}, no_marker)
    mismatched = tmp_path / "mismatched.pt"  # marker and config fine, weights of another model
    torch.save(
        {
            "format": FORMAT,
            "model": {"fc.weight": torch.zeros(2, 2)},
            "step": 1,
            "config": {"arch": "resnet18", "image_size": 32, "proj_dim": 8},
        },
        mismatched,
    )
    return {
        "missing": tmp_path / "nope.pt",
        "random": random_bytes,
        "no_marker": no_marker,
        "mismatched": mismatched,
    }


@pytest.mark.parametrize("kind, message", [
    ("missing", "checkpoint not found"),
    ("random", "cannot read checkpoint"),
    ("no_marker", "not a simclr-embed checkpoint"),
    ("mismatched", "does not match its config"),
])  # fmt: skip
def test_bad_checkpoint_is_one_line_exit_1(kind, message, bad_checkpoints, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    code, _, err = run_cli(
        ["--checkpoint", str(bad_checkpoints[kind]), "--output", str(out)], capsys
    )
    assert code == 1
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_dispatcher_routes_export_onnx(tmp_path, capsys):
    code = simclr_cli.main(
        [
            "export-onnx",
            "--checkpoint",
            str(tmp_path / "x.pt"),
            "--output",
            str(tmp_path / "x.onnx"),
        ]
    )
    assert code == 1 and "checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize("extra, flag", [
    (["--bogus"], "--bogus"),
    (["--opset", "12"], "--opset"),
    (["--quantize", "int4"], "--quantize"),
    (["--fp16", "--quantize", "int8"], "--fp16"),
    (["--calibration-data", "imgs"], "--calibration-data"),
    (["--quantize", "int8", "--quantize-mode", "static"], "--quantize-mode"),
    (["--triton-max-batch", "0"], "--triton-max-batch"),
    (["--triton-name", "../evil"], "--triton-name"),
])  # fmt: skip
def test_bad_usage_exits_2_naming_the_flag(extra, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", "c.pt", "--output", str(tmp_path / "m.onnx"), *extra])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_missing_calibration_folder_fails_before_exporting(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--output",
        str(out),
        "--quantize",
        "int8",
        "--calibration-data",
        str(tmp_path / "nowhere"),
    ]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "calibration folder not found" in err and not out.exists()


@pytest.fixture(scope="module")
def trained_checkpoint(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real optimizer step of the real trainer (resnet18, 32 px): its checkpoint format."""
    from simclr_embed.training.cli import main as train_main

    out = tmp_path_factory.mktemp("run")
    code = train_main(
        [
            "--data",
            str(image_folder),
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
            "1",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--no-progress",
        ]
    )
    assert code == 0
    return out / "checkpoints" / "last.pt"


def test_end_to_end_module_cli(trained_checkpoint, tmp_path):
    """python -m simclr_embed.export on a trained checkpoint: fp32 verified, int8 (dynamic), Triton repo."""
    out = tmp_path / "model-int8.onnx"
    repo = tmp_path / "triton"
    cmd = [
        sys.executable,
        "-m",
        "simclr_embed.export",
        "--checkpoint",
        str(trained_checkpoint),
        "--output",
        str(out),
        "--quantize",
        "int8",
        "--triton-repo",
        str(repo),
        "--triton-name",
        "enc",
    ]
    done = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    stdout = done.stdout
    for n in (1, 7):
        for name in ("features", "projection"):
            assert f"fp32 ORT CPU vs PyTorch N={n} {name}" in stdout
    assert "max_abs=" in stdout and "min_cos=" in stdout and "FAIL" not in stdout
    assert "int8 (dynamic)" in stdout and "speed-up x" in stdout
    assert "error" not in done.stderr.lower()
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["simclr.precision"] == "int8" and meta["simclr.train_step"] == "1"
    assert meta["simclr.projection_dim"] == "16"
    assert (repo / "enc" / "1" / "model.onnx").read_bytes() == out.read_bytes()
    assert 'name: "enc"' in (repo / "enc" / "config.pbtxt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-int8.onnx", "triton"]


def test_refuses_to_overwrite_the_checkpoint(tiny_checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    code, _, err = run_cli(["--checkpoint", str(ckpt), "--output", str(ckpt)], capsys)
    assert code == 1 and "would overwrite the checkpoint" in err
    assert ckpt.read_bytes() == tiny_checkpoint.read_bytes()
