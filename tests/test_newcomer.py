"""The small things a new user hit (issue 20, item 9): help texts that say what is true, errors
that say what to do, nothing left behind by a typo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from simclr_embed.cli import main as simclr

REPO = Path(__file__).resolve().parents[1]


def _help(*cmd: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "simclr_embed.cli", *cmd, "--help"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return " ".join(run.stdout.split())


def test_help_texts_say_what_is_true() -> None:
    export = _help("export-onnx")
    no_verify = export.split("--no-verify", 2)[-1].split("--exporter")[0]
    assert "default: True" not in no_verify and "by default they run" in no_verify
    assert "embed image files/folders: offline, through servers, or on Ray" in _help()
    assert "(what simclr embed wrote)." in _help("neighbors")  # the whole sentence, not cut off
    assert "health" in _help()


def test_a_checkpoint_folder_is_named_as_a_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    assert simclr(["export-onnx", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "m.onnx")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "is a folder" in err and f"{tmp_path}/checkpoints/last.pt" in err, err


@pytest.mark.slow
def test_a_data_typo_leaves_no_output_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert simclr(["train", "--data", str(tmp_path / "imgaes"), "--out", str(out), "--device", "cpu"]) == 1  # fmt: skip
    assert "no such folder" in capsys.readouterr().err
    assert not out.exists()


def test_a_missing_extra_is_named_not_a_traceback(tmp_path: Path) -> None:
    """The serve-only install has no torch: `simclr train` says which extra to install."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # as if torch were not installed
        "from simclr_embed.cli import main\n"
        f"sys.exit(main(['train', '--data', {str(tmp_path)!r}, '--out', {str(tmp_path / 'o')!r}]))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.strip() == (
        "error: 'simclr train' needs torch, which is not installed: install the train extra: "
        "pip install 'simclr-embed[train]'"
    )
