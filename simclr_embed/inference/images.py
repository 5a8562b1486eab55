"""Turn request images (encoded file bytes or raw pixels) into model input ``[S, S, 3]`` uint8.

Runs in worker threads (Pillow releases the GIL while decoding and resizing), one image per
call, so a bad image fails only its own request, before anything is batched. Every way an image
can be bad ends in :class:`ImageError` with a reason; the servicer adds the image's index.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from simclr_embed.imageio import DEFAULT_CROP_FRACTION, apply_resize, to_rgb

DEFAULT_MAX_PIXELS = 50_000_000

# Formats the API promises (CONTRACT §4); the JPEG opener also yields MPO (many cameras' JPEGs).
# Restricting Image.open to these keeps plugins such as EPS (which shells out to Ghostscript)
# unreachable.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# JPEG draft decoding (DCT scaling by 1/2, 1/4, 1/8) down to no less than the side the resize
# policy works from: the same rule as evaluation (`open_image(draft_size=...)`), so a file gives
# the same model input here and there. It cuts decode + resize of a 640x480 photo for a 64 px
# model about 3x; the DCT reduction is itself a low-pass, so the bicubic resize after it stays
# alias-free.


class ImageError(ValueError):
    """A request image that cannot be used; ``str(exc)`` is the reason (no index)."""


class RawPixels(Protocol):
    """What :meth:`Preprocessor.raw_batch` reads (``simclr.v1.RawImage`` has it)."""

    pixels: bytes
    height: int
    width: int
    channels: int


@dataclass(frozen=True)
class Preprocessor:
    """How this model wants its images: ``size`` px square, by the ``simclr.resize`` policy.

    Attributes:
        size: the model's input side S.
        policy: ``"resize"`` or ``"shorter-side-crop:F"`` (ONNX metadata ``simclr.resize``).
        max_pixels: images with more pixels are refused before any pixel is decoded.
    """

    size: int
    policy: str
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"image size must be positive, got {self.size}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        # Fail at start-up, not on the first request, if the model carries a policy we don't know.
        apply_resize(Image.new("RGB", (2 * self.size, self.size)), self.size, self.policy)

    @property
    def needed_side(self) -> int:
        """The smallest shorter side the resize policy works from without upsampling."""
        kind, _, arg = self.policy.partition(":")
        if kind == "shorter-side-crop":
            return round(self.size / (float(arg) if arg else DEFAULT_CROP_FRACTION))
        return self.size

    def _check_pixels(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise ImageError(f"image has an empty size {width}x{height}")
        if width * height > self.max_pixels:
            raise ImageError(
                f"image is {width}x{height} = {width * height} pixels, over the limit of "
                f"{self.max_pixels} (--max-pixels)"
            )

    def from_encoded(self, data: bytes) -> np.ndarray:
        """Decode JPEG/PNG/WebP/BMP/GIF/TIFF bytes → ``[S, S, 3]`` uint8 (first frame, EXIF-oriented)."""
        if not data:
            raise ImageError("empty image bytes")
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as exc:
            raise ImageError(f"too many pixels ({exc})") from None
        except UnidentifiedImageError:
            claimed = _format_by_signature(data)
            if claimed:  # the right magic bytes, but a variant Pillow has no decoder for
                raise ImageError(
                    f"starts like a {claimed} file but cannot be read: corrupt, or a variant "
                    "(pixel layout, bit depth, compression) the decoder does not support"
                ) from None
            raise ImageError(f"not a {'/'.join(ALLOWED_FORMATS)} image") from None
        except Exception as exc:  # Pillow raises many types on junk; all mean "not an image"
            raise ImageError(f"not a decodable image ({_describe(exc)})") from None
        with img:
            # Image.open has read only the header: refuse bombs before decoding a single pixel.
            self._check_pixels(*img.size)
            try:
                if img.format in ("JPEG", "MPO"):
                    img.draft("RGB", (self.needed_side, self.needed_side))
                img.load()
                rgb = to_rgb(img)
                return np.asarray(apply_resize(rgb, self.size, self.policy), dtype=np.uint8)
            except Exception as exc:  # truncated/corrupt data surfaces only while decoding
                raise ImageError(f"cannot decode {img.format} image ({_describe(exc)})") from None

    def from_raw(self, pixels: bytes, height: int, width: int, channels: int) -> np.ndarray:
        """Row-major HWC uint8 pixels (1 = gray, 3 = RGB) → ``[S, S, 3]`` uint8."""
        if channels not in (1, 3):
            raise ImageError(f"raw image has {channels} channels; expected 1 (gray) or 3 (RGB)")
        self._check_pixels(width, height)
        expected = height * width * channels
        if len(pixels) != expected:
            raise ImageError(
                f"raw image has {len(pixels)} bytes, expected height*width*channels = "
                f"{height}*{width}*{channels} = {expected}"
            )
        arr = np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, channels)
        if self.is_direct(height, width):  # already the model's input: no Pillow round trip
            return np.repeat(arr, 3, axis=2) if channels == 1 else arr.copy()
        img = Image.fromarray(arr[:, :, 0]) if channels == 1 else Image.fromarray(arr)
        return np.asarray(apply_resize(img.convert("RGB"), self.size, self.policy), dtype=np.uint8)

    def raw_batch(self, raws: Sequence[RawPixels]) -> np.ndarray | None:
        """``[n, S, S, 3]`` of raw RGB images that are all exactly the model's input, as one
        copy of their pixels; None when any is not (the per-image path says which and why)."""
        size, n = self.size, len(raws)
        length = size * size * 3
        if self.policy != "resize" or not all(
            r.height == size and r.width == size and r.channels == 3 and len(r.pixels) == length
            for r in raws
        ):
            return None
        pixels = raws[0].pixels if n == 1 else b"".join(r.pixels for r in raws)
        # One image: a read-only view of the request's bytes; nothing downstream writes to it.
        return np.frombuffer(pixels, dtype=np.uint8).reshape(n, size, size, 3)

    def is_direct(self, height: int, width: int) -> bool:
        """Raw pixels of this size are the model input as they are (``resize`` to S×S is the
        identity): a copy, cheap enough to do without a decode thread."""
        return self.policy == "resize" and height == width == self.size


_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


def _format_by_signature(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
