"""The curated collection: real image files embedded by ``simclr embed --model``."""

from __future__ import annotations

from pathlib import Path

import pytest

from simclr_embed.cli import main as simclr
from tests.curate.test_curate import write_collection


@pytest.fixture(scope="session")
def embedded(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("curate")
    data, exact = write_collection(work / "data")
    out = work / "emb.npy"
    assert simclr(["embed", "--model", str(tiny_onnx), "--output", str(out), "--no-progress", str(data)]) == 0  # fmt: skip
    return out, exact
