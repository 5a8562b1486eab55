"""A messy image collection, as real ones are: nested folders, every format and odd mode, and
~5 % bad files of every kind — with the list of which is which."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from tests.server.conftest import photo
from tests.server.test_images import png_claiming


def _jpeg(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _unreadable_tiff() -> bytes:
    """A TIFF whose header is fine but whose pixel layout (2 × 16-bit samples) Pillow lacks."""
    data = bytearray(_save(Image.new("LA", (8, 8)), "TIFF"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        off = ifd + 2 + 12 * i
        tag, typ, cnt, _ = struct.unpack_from("<HHII", data, off)
        if tag == 258:  # BitsPerSample
            struct.pack_into("<HHIHH", data, off, tag, typ, cnt, 16, 16)
    return bytes(data)


def good_images(seed: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of usable images in every supported format and odd mode."""
    rng = np.random.default_rng(seed)

    def pic(k: int) -> Image.Image:
        w, h = (int(v) for v in rng.integers(24, 72, 2))
        return photo(w, h, seed=seed * 100 + k)

    rotated = pic(7)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° when displayed
    sixteen = Image.fromarray(np.asarray(pic(8).convert("L"), np.uint16) * 257)  # I;16
    return [
        ("rgb.png", _save(pic(0), "PNG")),
        ("photo.jpg", _jpeg(pic(1))),
        ("gray.png", _save(pic(2).convert("L"), "PNG")),
        ("alpha.png", _save(pic(3).convert("RGBA"), "PNG")),
        ("cmyk.jpg", _jpeg(pic(4).convert("CMYK"))),
        ("palette.gif", _save(pic(5).convert("P"), "GIF")),
        ("lossless.webp", _save(pic(6), "WEBP", lossless=True)),
        ("rotated.jpg", _jpeg(rotated, exif=exif.tobytes())),
        ("sixteen.png", _save(sixteen, "PNG")),
        ("bitmap.bmp", _save(pic(9), "BMP")),
        ("scan.tiff", _save(pic(10), "TIFF")),
    ]


def bad_files() -> list[tuple[str, bytes | None]]:
    """(file name, bytes) of unusable files; ``None``: a symlink to nothing (unreadable)."""
    jpeg = _jpeg(photo(64, 64, seed=99))
    return [
        ("garbage.jpg", np.random.default_rng(0).bytes(700)),  # not an image
        ("truncated.jpg", jpeg[: len(jpeg) // 2]),  # cut off half-way
        ("bomb.png", png_claiming(100_000, 100_000)),  # too many pixels
        ("empty.png", b""),
        ("layout.tif", _unreadable_tiff()),  # a TIFF variant Pillow cannot read
        ("dangling.jpg", None),  # unreadable: the file it points to is gone
    ]


def write_collection(root: Path, groups: int = 9) -> tuple[list[Path], list[Path]]:
    """``groups`` nested folders of good images plus the bad files spread among them.

    Returns (good paths, bad paths), each sorted (the order every path of the product uses).
    """
    good, bad = [], []
    folders = [root / "a", root / "a" / "b", root / "c" / "d e", root]
    for g in range(groups):
        folder = folders[g % len(folders)] / f"g{g}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in good_images(g):
            path = folder / name
            path.write_bytes(data)
            good.append(path)
    for k, (name, data) in enumerate(bad_files()):
        path = folders[k % len(folders)] / f"bad-{name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            path.symlink_to(root / "gone" / name)
        else:
            path.write_bytes(data)
        bad.append(path)
    return sorted(good), sorted(bad)
