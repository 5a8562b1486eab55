"""Preprocessor: bombs refused before decoding, JPEG draft decoding, resize policies, raw checks."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from simclr_embed.imageio import open_image, to_model_input
from simclr_embed.inference.images import ImageError, Preprocessor
from tests.server.conftest import encode, photo


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width``×``height`` (the data could never fill it)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (8_000, 8_000)])
def test_pixel_limit_is_checked_from_the_header(width: int, height: int) -> None:
    # 8000² = 64 MP is under Pillow's own bomb limit (~89 MP): only our check can refuse it.
    with pytest.raises(ImageError, match="pixels"):
        Preprocessor(32, "resize").from_encoded(png_claiming(width, height))


def test_pixel_limit_is_configurable() -> None:
    data = encode(photo(100, 100), "PNG")
    with pytest.raises(ImageError, match="over the limit of 9999"):
        Preprocessor(32, "resize", max_pixels=9_999).from_encoded(data)
    assert Preprocessor(32, "resize", max_pixels=10_000).from_encoded(data).shape == (32, 32, 3)


def test_large_jpeg_is_decoded_at_reduced_scale() -> None:
    data = encode(photo(1024, 768, seed=1), "JPEG", quality=95)
    got = Preprocessor(32, "resize").from_encoded(data)
    # What draft decoding means here: DCT-scaled by 1/8 to 128×96 (still >= 32), then resize.
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (32, 32))
        assert im.size == (128, 96)
        want = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(got, want)
    full = np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    )
    assert np.abs(got.astype(int) - full).mean() < 4  # same picture as a full decode


def test_jpeg_input_is_the_shared_definition_of_an_image_in() -> None:
    """Served pixels == simclr_embed.imageio's (what evaluation uses) for a JPEG worth drafting."""
    data = encode(photo(640, 480, seed=9), "JPEG", quality=90)
    for size, policy in ((64, "resize"), (96, "shorter-side-crop:0.875")):
        got = Preprocessor(size, policy).from_encoded(data)
        want = to_model_input(
            open_image(data, draft_size=Preprocessor(size, policy).needed_side), size, policy
        )
        np.testing.assert_array_equal(got, want)


def test_shorter_side_crop_policy() -> None:
    img = photo(300, 200, seed=2)
    got = Preprocessor(224, "shorter-side-crop:0.875").from_encoded(encode(img, "PNG"))
    # shorter side to 224 / 0.875 = 256 → 384×256, then the centre 224×224.
    want = np.asarray(img.resize((384, 256), Image.Resampling.BICUBIC).crop((80, 16, 304, 240)))
    np.testing.assert_array_equal(got, want)


def test_exif_orientation_is_applied() -> None:
    img = photo(48, 32, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = encode(img, "JPEG", quality=95, exif=exif)
    got = Preprocessor(32, "resize").from_encoded(data)
    upright = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert upright.size == (32, 48)
    np.testing.assert_array_equal(
        got, np.asarray(upright.resize((32, 32), Image.Resampling.BICUBIC))
    )


def test_raw_gray_and_rgb() -> None:
    pre = Preprocessor(16, "resize")
    rgb = np.asarray(photo(20, 24, seed=4))  # [24, 20, 3]
    got = pre.from_raw(rgb.tobytes(), 24, 20, 3)
    np.testing.assert_array_equal(
        got, np.asarray(Image.fromarray(rgb).resize((16, 16), Image.Resampling.BICUBIC))
    )
    gray = rgb[:, :, 1].copy()
    got = pre.from_raw(gray.tobytes(), 24, 20, 1)
    assert (got[:, :, 0] == got[:, :, 1]).all() and (got[:, :, 1] == got[:, :, 2]).all()


@pytest.mark.parametrize(
    ("pixels", "h", "w", "c", "reason"),
    [
        (b"\0" * 47, 4, 4, 3, "47 bytes"),
        (b"\0" * 32, 4, 4, 2, "2 channels"),
        (b"\0" * 64, 4, 4, 4, "4 channels"),
        (b"", 0, 4, 3, "empty size"),
        (b"", 10_000, 10_000, 3, "pixels"),
    ],
)
def test_raw_errors(pixels: bytes, h: int, w: int, c: int, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        Preprocessor(16, "resize").from_raw(pixels, h, w, c)


def test_unknown_resize_policy_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="policy"):
        Preprocessor(32, "stretch-somehow")
