"""Atomic writes: the finished file is complete and has a plain file's mode; a failure leaves the
old file and no temporary behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from simclr_embed.fileio import atomic_path, atomic_write_text


def test_finished_file_has_the_mode_open_would_give(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "hello\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # the reference: what open() gives under this process's umask
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert target.read_text() == "hello\n"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.txt"]
