"""Labeled-folder reader: labels from subfolders, recursive inside a class; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from simclr_embed.errors import SimclrError
from simclr_embed.labeled import check_same_classes, list_labeled
from tests.conftest import write_image_folder


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)


def test_labels_follow_sorted_class_folders_and_recurse(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=3, classes=("b", "a"))
    _img(tmp_path / "a" / "nested" / "deeper" / "x.JPG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    paths, labels, names = list_labeled(tmp_path)
    assert names == ["a", "b"]
    assert len(paths) == 7 and labels == [0, 0, 0, 0, 1, 1, 1]
    assert all(p.parent.name == "a" or p.parent.parent.parent.name == "a" for p in paths[:4])
    assert all(p.parent.name == "b" for p in paths[4:])


def test_top_level_images_beside_classes_are_ignored(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=2, classes=("a", "b"))
    _img(tmp_path / "stray.png")
    paths, _, _ = list_labeled(tmp_path)
    assert len(paths) == 4 and tmp_path / "stray.png" not in paths


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "not a folder"),
        ("file", "not a folder"),
        ("empty", "no class subfolders"),
        ("unlabeled", "no class subfolders"),
        ("single", "single class"),
        ("empty_class", "without images"),
    ],
)
def test_errors(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "data"
    if layout == "file":
        root.write_bytes(b"not a folder")
    elif layout == "empty":
        root.mkdir()
    elif layout == "unlabeled":
        _img(root / "1.png")
        _img(root / "2.png")
    elif layout == "single":
        write_image_folder(root, per_class=2, classes=("only",))
    elif layout == "empty_class":
        write_image_folder(root, per_class=2, classes=("a", "b"))
        (root / "c").mkdir()
    with pytest.raises(SimclrError, match=message):
        list_labeled(root)


def test_class_sets_must_match() -> None:
    check_same_classes(["a", "b"], ["a", "b"])
    with pytest.raises(SimclrError, match=r"only in --train: c; only in --val: d"):
        check_same_classes(["a", "b", "c"], ["a", "b", "d"])
