"""A near-duplicate threshold that fits the model, measured on the collection itself.

One fixed cosine cannot serve every model: a briefly trained model puts a JPEG-q50, resized,
cropped copy at cosine ~0.9 to its original, a well-trained one at ~0.99, while different photos
of one blue sky can reach 0.98. So: take a sample of the collection's images, make synthetic
copies of each (the edits that make real near-duplicates: re-encoded at low JPEG quality,
resized, slightly cropped, converted to PNG or grey, and these combined), embed them with the
collection's own model, and put the threshold between

- positives: each copy's cosine to its original's stored vector, and
- negatives: each sampled original's cosine to its nearest *other* image in the collection.
  Left out: byte copies, and neighbours that are the same picture at 16×16 grey (pixel
  correlation ≥ 0.95, independent of the model): a collection with near-duplicates has them
  among its nearest pairs, and counting them as negatives pushed the threshold to 1.0 on real
  photos with planted copies (docs/benchmarks.md "Curate").

Precision first: a false merge hides a distinct image. The threshold is the midpoint between the
positives' 5th percentile and the negatives' 99th when those are apart; otherwise just above
the negatives' 99th percentile (at most 1 % of images get a false pair). The negatives come from
up to 2,000 images (they need no embedding), so a handful of odd look-alike pairs cannot set the
threshold alone. Printed with what it achieves on the calibration itself.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from simclr_embed.neighbors.search import normalized

POSITIVE_QUANTILE, NEGATIVE_QUANTILE = 0.05, 0.99
SAME_PICTURE = 0.95  # 16×16 grey correlation; distinct CIFAR neighbours measured ≤ 0.87


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _crop(img: Image.Image, fraction: float) -> Image.Image:
    dx, dy = round(img.width * fraction / 2), round(img.height * fraction / 2)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


def _scale(img: Image.Image, factor: float) -> Image.Image:
    size = (max(8, round(img.width * factor)), max(8, round(img.height * factor)))
    return img.resize(size, Image.Resampling.BILINEAR)


# name → edit of an RGB image into the bytes of a file.
EDITS: dict[str, Callable[[Image.Image], bytes]] = {
    "jpeg-q40": lambda im: _jpeg(im, 40),
    "resize-x0.5": lambda im: _png(_scale(im, 0.5)),
    "crop-5%": lambda im: _png(_crop(im, 0.05)),
    "png-grey": lambda im: _png(ImageOps.grayscale(im)),
    "combined": lambda im: _jpeg(_scale(_crop(im, 0.05), 0.75), 50),
}


def copies_of(data: bytes) -> list[bytes]:
    """One synthetic near-copy of an image file per :data:`EDITS` entry."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = ImageOps.exif_transpose(img).convert("RGB")
    return [edit(rgb) for edit in EDITS.values()]


def signature(data: bytes) -> np.ndarray:
    """``[256]`` zero-mean unit vector of the picture at 16×16 grey: what re-encoding, resizing,
    a slight crop or a format change leave alone."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("L", (64, 64))  # JPEG: decode at a reduced scale, cheap for big files
        grey = ImageOps.exif_transpose(img).convert("L").resize((16, 16), Image.Resampling.BOX)
    a = np.asarray(grey, np.float32).ravel()
    a -= a.mean()
    return a / max(float(np.linalg.norm(a)), 1e-6)


def same_signature(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """True when two :func:`signature` s show the same picture (flat images: only when both
    are flat; an unreadable file, ``None``, is a different picture so the guard stays)."""
    if a is None or b is None:
        return False
    if not a.any() or not b.any():
        return not a.any() and not b.any()
    return float(a @ b) >= SAME_PICTURE


@dataclass(frozen=True)
class Calibration:
    threshold: float
    recall: float  # copies at or above the threshold
    recall_by_edit: dict[str, float]
    false_pair_rate: float  # originals whose nearest other image is at or above it
    positives: int
    negatives: int
    set_aside: int = 0  # sampled images whose nearest neighbours were the same picture

    def describe(self) -> str:
        edits = ", ".join(f"{k} {v:.0%}" for k, v in self.recall_by_edit.items())
        return (
            f"near-duplicate threshold {self.threshold:.4f} (calibrated on {self.negatives} of "
            f"the collection's images and {self.positives} synthetic copies: recall "
            f"{self.recall:.1%} [{edits}], false pairs {self.false_pair_rate:.1%}; "
            f"{self.set_aside} sampled images had a near-duplicate in the collection, left out "
            "of the negatives)"
        )


def choose_threshold(positives: np.ndarray, negatives: np.ndarray) -> float:
    high_neg = float(np.quantile(negatives, NEGATIVE_QUANTILE)) if len(negatives) else -1.0
    low_pos = float(np.quantile(positives, POSITIVE_QUANTILE))
    if low_pos > high_neg:
        return (low_pos + high_neg) / 2
    return min(1.0, np.nextafter(np.float32(high_neg), np.float32(2)).item())


def calibrate(
    embed: Callable[[list[bytes]], tuple[np.ndarray, list[int]]],
    files: Sequence[bytes],
    originals: np.ndarray,
    nearest_other: np.ndarray,
    set_aside: int = 0,
) -> Calibration:
    """``embed(file bytes) → (vectors [m, D], indices of the usable inputs)``; ``files`` are the
    sampled originals' bytes, ``originals`` their stored vectors ``[n, D]`` and
    ``nearest_other`` their cosine to the nearest other image that is not the same picture
    ``[≤ n]`` (``set_aside``: how many had only such neighbours before it)."""
    items, owner, edit = [], [], []
    for i, data in enumerate(files):
        try:
            made = copies_of(data)
        except Exception:  # an original PIL cannot edit: left out of the calibration
            continue
        items += made
        owner += [i] * len(made)
        edit += list(EDITS)
    vectors, used = embed(items)
    owners = np.array(owner)[used]
    edits = np.array(edit)[used]
    positives = np.einsum("nd,nd->n", normalized(vectors), normalized(originals)[owners])
    negatives = np.asarray(nearest_other, np.float32)
    threshold = choose_threshold(positives, negatives)
    by_edit = {name: float((positives[edits == name] >= threshold).mean()) for name in EDITS}
    return Calibration(
        threshold=float(threshold),
        recall=float((positives >= threshold).mean()),
        recall_by_edit=by_edit,
        false_pair_rate=float((negatives >= threshold).mean()) if len(negatives) else 0.0,
        positives=len(positives),
        negatives=len(negatives),
        set_aside=set_aside,
    )
