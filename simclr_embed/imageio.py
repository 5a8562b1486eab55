"""One definition of "an image in", shared by training, evaluation and serving (Pillow only).

- ``list_images`` finds image files recursively (case-insensitive extensions).
- ``to_rgb`` applies EXIF orientation and converts any mode (L, LA, P, RGBA, CMYK, I;16, I, F)
  to 8-bit RGB.
- ``resize_policy_for`` / ``apply_resize`` bring an arbitrary image to S×S the way evaluation and
  serving agree on; the policy string travels in the ONNX metadata (``simclr.resize``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from simclr_embed.errors import SimclrError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# ImageNet statistics: the normalization used in training and baked into the ONNX graph.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# "shorter-side-crop:F": shorter side to S/F, then centre crop S×S (the ImageNet eval recipe,
# F = 0.875 → 256 for 224). "resize": plain resize to S×S (small images, where a crop would
# throw away a large part of an already tiny picture).
DEFAULT_CROP_FRACTION = 0.875


def is_image_file(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root`` (recursive, following no symlinked folders), sorted."""
    return list(iter_images(root))


def iter_images(root: str | os.PathLike[str]) -> Iterator[Path]:
    """``list_images(root)`` lazily, in the same (sorted) order, one folder listing at a time.

    ``Path`` ordering compares component by component, so a depth-first walk that visits each
    folder's entries sorted by name — files and subfolders interleaved — yields exactly the
    sorted order: memory grows with the widest folder, not with the collection.
    """
    try:
        with os.scandir(root) as scan:
            entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    for entry in entries:
        path = Path(root) / entry.name
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if is_dir:
            yield from iter_images(path)
        elif is_image_file(entry.name):
            yield path  # a file, or a symlink to one (broken ones too: reading them fails later)


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF-orient and convert any Pillow mode to 8-bit RGB (alpha composited on white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit gray: scale the full range to 8 bits rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(
    source: str | os.PathLike[str] | bytes, *, draft_size: int | None = None
) -> Image.Image:
    """Open a path or encoded bytes as RGB; first frame of animations.

    ``draft_size``: let JPEG decode at a reduced scale (DCT scaling) when the image is much larger
    than needed; the result is still at least ``draft_size`` on its shorter side.
    Raises ``OSError``/``PIL.UnidentifiedImageError``/``Image.DecompressionBombError`` on bad data.
    """
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    with Image.open(fp) as img:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.seek(0)
        img.load()
        return to_rgb(img)


def resize_policy_for(image_size: int) -> str:
    """The ``simclr.resize`` policy for a model trained at ``image_size`` px."""
    return "resize" if image_size <= 64 else f"shorter-side-crop:{DEFAULT_CROP_FRACTION}"


def apply_resize(img: Image.Image, size: int, policy: str) -> Image.Image:
    """Bring ``img`` to ``size``×``size`` according to ``policy`` (bicubic, antialiased)."""
    if policy == "resize":
        return img.resize((size, size), Image.Resampling.BICUBIC)
    kind, _, arg = policy.partition(":")
    if kind != "shorter-side-crop":
        raise ValueError(f"unknown resize policy {policy!r}")
    fraction = float(arg) if arg else DEFAULT_CROP_FRACTION
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"crop fraction must be in (0, 1], got {fraction}")
    short = round(size / fraction)
    w, h = img.size
    scale = short / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_model_input(img: Image.Image, size: int, policy: str) -> np.ndarray:
    """RGB image → uint8 ``[S, S, 3]`` array ready for the ONNX ``images`` input."""
    return np.asarray(apply_resize(to_rgb(img), size, policy), dtype=np.uint8)


def _needed_side(size: int, policy: str) -> int:
    """Shorter side the resize policy scales to: JPEG may be DCT-decoded down to it."""
    kind, _, arg = policy.partition(":")
    return round(size / float(arg)) if kind == "shorter-side-crop" and arg else size


def load_uint8(path: str | os.PathLike[str], size: int, policy: str) -> np.ndarray:
    """One image file → uint8 ``[S, S, 3]`` (RGB); ``SimclrError`` naming the file if unreadable."""
    try:
        img = open_image(path, draft_size=_needed_side(size, policy))
        # np.array (a writable copy), not asarray: callers wrap it with torch.from_numpy.
        return np.array(apply_resize(img, size, policy), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three on bad data
        raise SimclrError(f"cannot read image {path}: {exc}") from exc
