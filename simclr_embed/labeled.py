"""Labeled image folders: ``root/<class>/**/<image>``, one subfolder per class (ImageFolder layout).

Torch-free, so the training monitor and ``simclr evaluate`` share one reader and one set of
error messages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from simclr_embed.errors import SimclrError
from simclr_embed.imageio import is_image_file, list_images

log = logging.getLogger(__name__)


def list_labeled(root: str | os.PathLike[str]) -> tuple[list[Path], list[int], list[str]]:
    """``(paths, labels, class_names)`` of a labeled folder; labels index the sorted class names.

    Images are searched recursively inside each class folder. Raises ``SimclrError`` when
    ``root`` is not a folder, has no class subfolders with images (e.g. only unlabeled images at
    the top level), has a class folder without images, or has fewer than two classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise SimclrError(f"not a folder: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    top_level = [
        p for p in root.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith(".")
    ]
    if not class_dirs:
        if top_level:
            raise SimclrError(
                f"{root} has {len(top_level)} images but no class subfolders; "
                f"a labeled folder needs one subfolder per class"
            )
        raise SimclrError(f"{root} has no class subfolders (expected {root}/<class>/<image>)")
    if top_level:
        log.warning("%s: ignoring %d images outside class subfolders", root, len(top_level))
    paths: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    empty: list[str] = []
    for d in class_dirs:
        images = list_images(d)
        if not images:
            empty.append(d.name)
            continue
        label = len(names)
        names.append(d.name)
        paths.extend(images)
        labels.extend([label] * len(images))
    if not names:
        raise SimclrError(f"{root} has class subfolders but no images in any of them")
    if empty:
        raise SimclrError(
            f"{root}: class folder(s) without images: {', '.join(empty[:5])}"
            + (" ..." if len(empty) > 5 else "")
        )
    if len(names) < 2:
        raise SimclrError(
            f"{root} has a single class ({names[0]!r}); classification needs at least two"
        )
    return paths, labels, names


def check_same_classes(train_names: Sequence[str], val_names: Sequence[str]) -> None:
    """Raise ``SimclrError`` unless the train and val folders have the same class names."""
    if list(train_names) == list(val_names):
        return
    only_train = sorted(set(train_names) - set(val_names))
    only_val = sorted(set(val_names) - set(train_names))
    parts = []
    if only_train:
        parts.append(f"only in --train: {', '.join(only_train[:5])}")
    if only_val:
        parts.append(f"only in --val: {', '.join(only_val[:5])}")
    raise SimclrError("--train and --val have different classes (" + "; ".join(parts) + ")")
