"""``simclr embed --update``: only new or changed files are embedded, rows of deleted files are
dropped, every other row is kept byte for byte; the result equals a fresh run over the folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from simclr_embed.cli import main as simclr
from tests.conftest import write_image_folder


def read(out: Path) -> dict[str, np.ndarray]:
    """path → vector, whatever the format."""
    if out.is_dir():
        table = ds.dataset(out, format="parquet").to_table()
        vectors = np.array(table.column("embedding").to_pylist(), np.float32)
        return dict(zip(table.column("path").to_pylist(), vectors, strict=True))
    paths = out.with_name(out.name + ".paths.txt").read_text().splitlines()
    return dict(zip(paths, np.load(out), strict=True))


@pytest.mark.parametrize("name", ["emb.npy", "emb-parquet"])
def test_update_embeds_only_what_changed(
    tiny_onnx: Path, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_image_folder(tmp_path / "data", per_class=3, size=24)
    out = tmp_path / name
    embed = ["embed", "--no-progress", "--model", str(tiny_onnx), "--output", str(out)]
    assert simclr([*embed, str(data)]) == 0
    before = read(out)
    files = sorted(before)
    gone, changed, same = files[0], files[1], files[2:]
    os.unlink(gone)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(changed)  # new bytes, new size and mtime
    (data / "new").mkdir()
    for i in range(2):
        Image.new("RGB", (24, 24), (10 * i, 90, 30)).save(data / "new" / f"n{i}.png")
    capsys.readouterr()
    assert simclr([*embed, "--update", str(data)]) == 0
    said = capsys.readouterr()
    assert f"{len(same)} rows kept, 2 dropped (changed or gone), 3 files to embed" in said.err + said.out  # fmt: skip
    after = read(out)
    fresh_out = tmp_path / ("fresh.npy" if name.endswith(".npy") else "fresh")
    assert simclr(["embed", "--no-progress", "--model", str(tiny_onnx), "--output", str(fresh_out), str(data)]) == 0  # fmt: skip
    fresh = read(fresh_out)
    assert sorted(after) == sorted(fresh) and gone not in after
    for path in same:
        assert after[path].tobytes() == before[path].tobytes()  # kept, not re-embedded
    for path in after:
        np.testing.assert_allclose(after[path], fresh[path], atol=1e-5)
    # Nothing changed since: a second update embeds nothing and keeps every row.
    assert simclr([*embed, "--update", str(data)]) == 0
    assert f"{len(after)} rows kept, 0 dropped (changed or gone), 0 files to embed" in "".join(capsys.readouterr())  # fmt: skip
    assert read(out).keys() == after.keys()


def test_update_refuses_another_model_and_a_missing_output(
    tiny_onnx: Path,
    other_onnx: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = write_image_folder(tmp_path / "data", per_class=2, size=24)
    out = tmp_path / "emb.npy"
    assert simclr(["embed", "--no-progress", "--model", str(other_onnx), "--update", "--output", str(out), str(data)]) == 1  # fmt: skip
    assert "not a finished simclr embed output" in capsys.readouterr().err
    assert simclr(["embed", "--no-progress", "--model", str(tiny_onnx), "--output", str(out), str(data)]) == 0  # fmt: skip
    saved = out.read_bytes()
    assert simclr(["embed", "--no-progress", "--model", str(other_onnx), "--update", "--output", str(out), str(data)]) == 1  # fmt: skip
    assert "one output holds one model's vectors" in capsys.readouterr().err
    assert out.read_bytes() == saved
    with pytest.raises(SystemExit) as exc:
        simclr(["embed", "--model", str(tiny_onnx), "--update", "--resume", str(data)])
    assert exc.value.code == 2
    shutil.rmtree(data)
