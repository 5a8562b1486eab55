"""`simclr train` / `python -m simclr_embed.training`: exit 2 on bad usage, exit 1 with one clear line otherwise."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from simclr_embed.cli import main as simclr_main
from simclr_embed.errors import run_main
from simclr_embed.training.cli import main
from tests.conftest import write_image_folder

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--arch",
    "resnet18",
    "--image-size",
    "32",
    "--stem",
    "standard",
    "--proj-dim",
    "32",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--no-progress",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("cli") / "data", per_class=2)  # 6 images


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run in-process; assert exit 1 with exactly one `error:` line; return it."""
    code = run_main(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def test_module_help_and_bad_flag_exit_codes() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "simclr_embed.training", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = run("--help")
    assert ok.returncode == 0 and "--max-steps" in ok.stdout and "--eval-data" in ok.stdout
    bad = run("--data", "d", "--out", "o", "--temperature", "0")
    assert bad.returncode == 2 and "--temperature" in bad.stderr


def test_simclr_train_dispatches_to_training(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        simclr_main(["train", "--data", "d", "--out", "o", "--batch-size", "0"])
    assert exc.value.code == 2 and "--batch-size" in capsys.readouterr().err


def test_missing_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *TINY], capsys)
    assert "--data" in line and "no such folder" in line


def test_folder_without_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    line = _fails(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), *TINY], capsys)
    assert "no image files" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data", str(data), "--out", str(tmp_path / "o"), *TINY[:-1], "cuda"]
    assert "cuda" in _fails(argv, capsys).lower()


def test_batch_larger_than_dataset(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data", str(data), "--out", str(tmp_path / "o"), *TINY, "--batch-size", "8"]
    assert "--batch-size" in _fails(argv, capsys)


def test_only_corrupt_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "d"
    d.mkdir()
    for i in range(6):
        (d / f"{i}.jpg").write_bytes(b"nope")
    argv = ["--data", str(d), "--out", str(tmp_path / "o"), *TINY]
    assert "are they images" in _fails(argv, capsys)


def test_resume_without_checkpoint(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _fails(["--data", str(data), "--out", str(tmp_path / "o"), *TINY, "--resume"], capsys)
    assert "--resume" in line and "last.pt" in line


def test_resume_with_other_architecture(
    data: Path, tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "o" / "checkpoints").mkdir(parents=True)
    (tmp_path / "o" / "checkpoints" / "last.pt").write_bytes(tiny_checkpoint.read_bytes())
    argv = [
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
        *TINY,
        "--arch",
        "resnet34",
        "--resume",
    ]
    line = _fails(argv, capsys)
    assert "--arch" in line and "resnet18" in line


def test_resume_from_corrupt_checkpoint(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "o" / "checkpoints").mkdir(parents=True)
    (tmp_path / "o" / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    line = _fails(["--data", str(data), "--out", str(tmp_path / "o"), *TINY, "--resume"], capsys)
    assert "cannot read checkpoint" in line


def test_missing_eval_data_and_init_weights(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--data", str(data), *TINY, "--max-steps", "1"]
    line = _fails(
        [*base, "--out", str(tmp_path / "a"), "--init-weights", str(tmp_path / "no.pth")], capsys
    )
    assert "--init-weights" in line
    line = _fails(
        [*base, "--out", str(tmp_path / "b"), "--eval-data", str(tmp_path / "nothing")], capsys
    )
    assert "--eval-data" in line


def test_init_weights_are_loaded(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(1)
    weights = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(weights, tmp_path / "r18.pth")
    caplog.set_level(logging.INFO)
    argv = [
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
        *TINY,
        "--max-steps",
        "1",
        "--lr",
        "1e-9",
        "--init-weights",
        str(tmp_path / "r18.pth"),
    ]
    assert run_main(main, argv) == 0
    assert "(0 keys not in it)" in caplog.text and "left out" not in caplog.text
    trained = torch.load(tmp_path / "o" / "checkpoints" / "last.pt", weights_only=True)["model"]
    # one step at lr ≈ 0 barely moves the conv weights away from the given ones
    torch.testing.assert_close(
        trained["backbone.conv1.weight"], weights["conv1.weight"], atol=1e-6, rtol=0
    )
