"""The bundled sample dataset: deterministic, labeled by folder, and colour carries no class."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from simclr_embed.demo.sample_data import CLASSES, generate, main


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_sizes_and_modes(tmp_path: Path) -> None:
    paths = generate(tmp_path, per_class=3, size=40, seed=1)
    assert len(paths) == 3 * len(CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CLASSES)
    for p in paths:
        assert p.parent.name in CLASSES and p.suffix == ".png"
        with Image.open(p) as img:
            assert img.size == (40, 40) and img.mode == "RGB"
    # No temporary files left behind by the atomic writes.
    assert not list(tmp_path.rglob(".*"))


def test_deterministic_and_prefix_stable(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", per_class=4, seed=7)
    b = generate(tmp_path / "b", per_class=4, seed=7)
    assert _digest(a) == _digest(b)
    # Image i depends on (seed, class, i) only: asking for more images keeps the first ones.
    more = generate(tmp_path / "c", per_class=6, seed=7)
    by_name = {p.relative_to(tmp_path / "c"): p for p in more}
    for p in a:
        assert by_name[p.relative_to(tmp_path / "a")].read_bytes() == p.read_bytes()
    other = generate(tmp_path / "d", per_class=4, seed=8)
    assert _digest(other) != _digest(a)


def test_rerun_is_idempotent(tmp_path: Path) -> None:
    first = _digest(generate(tmp_path, per_class=2, seed=0))
    assert _digest(generate(tmp_path, per_class=2, seed=0)) == first


def _loo_1nn_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)  # [N, N]
    np.fill_diagonal(d, np.inf)
    return float((y[d.argmin(1)] == y).mean())


def test_colour_is_a_nuisance_but_shape_is_not(tmp_path: Path) -> None:
    """Mean colour predicts the class at about chance; a colour-free shape cue does much better.

    The shape cue is independent of the generator and ignores colour: on the gray image's
    gradient, keep the strong edges (magnitude above twice its median) and describe them by the
    sorted histogram of their orientations plus the sorted edge density of 4×4 blocks (sorting
    makes both roughly invariant to rotation and position).
    """
    per_class = 24
    paths = generate(tmp_path, per_class=per_class, size=32, seed=3)
    y = np.repeat(np.arange(len(CLASSES)), per_class)
    imgs = np.stack([np.asarray(Image.open(p), dtype=np.float64) for p in paths])  # [N, S, S, 3]
    mean_rgb = imgs.mean(axis=(1, 2))  # [N, 3]
    chance = 1.0 / len(CLASSES)
    assert _loo_1nn_accuracy(mean_rgb, y) < chance + 0.12
    gy, gx = np.gradient(imgs.mean(-1), axis=(1, 2))  # [N, S, S] each
    mag = np.hypot(gx, gy)
    edges = mag > np.median(mag, axis=(1, 2), keepdims=True) * 2  # [N, S, S] bool
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    orient = np.stack(
        [np.histogram(a[e], bins=8, range=(0, np.pi))[0] for a, e in zip(angle, edges, strict=True)]
    )
    orient = orient / np.maximum(orient.sum(1, keepdims=True), 1)  # [N, 8]
    blocks = edges.reshape(len(paths), 8, 4, 8, 4).mean(axis=(2, 4)).reshape(len(paths), -1)
    signature = np.concatenate([np.sort(orient, 1), np.sort(blocks, 1)], axis=1)  # [N, 72]
    assert _loo_1nn_accuracy(signature, y) > chance + 0.2


def test_cli(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "x"), "--per-class", "1", "--size", "16"]) == 0
    assert "wrote 8 images" in capsys.readouterr().out
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "simclr_embed.demo.sample_data",
            str(tmp_path / "y"),
            "--per-class",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "--per-class" in bad.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "simclr_embed.demo.sample_data", "out", "--bogus"],
        capture_output=True,
        text=True,
    )
    assert usage.returncode == 2 and "--bogus" in usage.stderr
