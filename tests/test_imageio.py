"""``iter_images``: the lazy listing bulk jobs walk, in exactly ``list_images``' sorted order."""

from __future__ import annotations

import os
import random
from pathlib import Path

from simclr_embed.imageio import is_image_file, iter_images, list_images

NAMES = ["a", "a.jpg", "a0.png", "a-b.jpg", "A.PNG", "b", "b.jpg", "z.gif", "a b.jpg", "é.jpg",
         "x.txt", ".hidden.jpg", "_u.jpg", "a.b", "ab"]  # fmt: skip


def _fill(folder: Path, rng: random.Random, depth: int) -> None:
    for name in rng.sample(NAMES, 7):
        path = folder / name
        if path.exists():
            continue
        if depth < 3 and rng.random() < 0.4:
            path.mkdir()
            _fill(path, rng, depth + 1)
        else:
            path.write_bytes(b"x")


def test_lazy_walk_is_the_sorted_listing(tmp_path: Path) -> None:
    for seed in range(5):
        root = tmp_path / f"r{seed}"
        root.mkdir()
        _fill(root, random.Random(seed), 0)
        (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")  # listed; reading it fails later
        walked = []
        for dirpath, dirnames, filenames in os.walk(root):  # an independent reference
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            walked += [
                Path(dirpath) / f for f in filenames if not f.startswith(".") and is_image_file(f)
            ]
        assert list(iter_images(root)) == sorted(walked) == list_images(root)
        assert len(walked) > 5
