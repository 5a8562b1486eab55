"""The Open Inference Protocol (KServe "V2") as this server speaks it, shared by the HTTP and the
gRPC adapter: the model's metadata, the ``images`` input tensor → the core's images, and the
requested outputs.

Input ``images`` is either

- ``BYTES [N]``: each element one image file (JPEG/PNG/...). Binary form (gRPC raw contents and
  HTTP's binary-data extension): each element is a 4-byte little-endian length, then its bytes.
  JSON form: each element a base64 string (JSON has no bytes), or a ``data:`` URI.
- ``UINT8 [N, H, W, C]`` (C = 3 RGB or 1 gray): raw pixels, row-major, resized like any image
  unless already ``S×S``.

Outputs ``features`` ``FP32 [N, F]`` and ``projection`` ``FP32 [N, P]``: all when none is asked.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from simclr_embed.inference.runtime import ModelInfo
from simclr_embed.server.core import OUTPUTS, ImageInput, InvalidRequest

INPUT = "images"
PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "simclr-embed"
# What tritonclient and KServe look for in GET /v2; "binary_tensor_data" is the binary extension.
EXTENSIONS = ("binary_tensor_data",)


def server_version() -> str:
    try:
        return metadata.version("simclr-embed")
    except metadata.PackageNotFoundError:
        return "0"


@dataclass(frozen=True)
class Pixels:
    """One raw image as the core takes it (the shape of a ``simclr.v1.RawImage``)."""

    pixels: bytes
    height: int
    width: int
    channels: int


def model_metadata(info: ModelInfo, name: str) -> dict[str, object]:
    """``GET /v2/models/{name}`` (and the gRPC ModelMetadata): inputs/outputs, shapes, types."""
    return {
        "name": name,
        "versions": [info.model_version],
        "platform": PLATFORM,
        # One entry per input name: image files. UINT8 [N, H, W, C] pixels are taken too
        # (docs/serving.md); the model's own input is [N, S, S, 3] (``simclr.image_size``).
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "features", "datatype": "FP32", "shape": [-1, info.feature_dim]},
            {"name": "projection", "datatype": "FP32", "shape": [-1, info.projection_dim]},
        ],
    }


def check_model(name: str, version: str, want: str, info: ModelInfo | None) -> None:
    """A call naming another model (or another version of ours) → :class:`UnknownModel`."""
    if name != want:
        raise UnknownModel(f"unknown model {name!r}: this server serves {want!r}")
    if version and info is not None and version != info.model_version:
        raise UnknownModel(
            f"model {name!r} has no version {version!r}: it serves {info.model_version!r}"
        )


class UnknownModel(Exception):
    """404 / NOT_FOUND."""


def split_bytes_tensor(raw: bytes, count: int) -> list[bytes]:
    """A serialized BYTES tensor (``<u4 length, bytes`` repeated) → its ``count`` elements."""
    out: list[bytes] = []
    view, at = memoryview(raw), 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidRequest(f"input {INPUT!r}: BYTES element {len(out)} is cut short")
        (length,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + length > len(raw):
            raise InvalidRequest(
                f"input {INPUT!r}: BYTES element {len(out)} says {length} bytes, "
                f"{len(raw) - at} are left",
                len(out),
            )
        out.append(bytes(view[at : at + length]))
        at += length
    if len(out) != count:
        raise InvalidRequest(f"input {INPUT!r}: shape says {count} elements, data holds {len(out)}")
    return out


def decode_base64_image(text: object, index: int) -> bytes:
    """A JSON string element: a ``data:image/...;base64,`` URI or bare base64 → the file bytes."""
    if not isinstance(text, str):
        raise InvalidRequest(f"image {index}: expected a base64 string", index)
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise InvalidRequest(
                f"image {index}: a data: URI must be base64 ('...;base64,')", index
            )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"image {index}: not valid base64", index) from None


def images_from_tensor(
    datatype: str, shape: Sequence[int], raw: bytes | None, elements: Sequence[object] | None
) -> list[ImageInput]:
    """The ``images`` input, as raw bytes (binary) or as JSON/proto elements → the core's images."""
    shape = [int(d) for d in shape]
    if datatype == "BYTES":
        if len(shape) != 1 or shape[0] < 0:
            raise InvalidRequest(f"input {INPUT!r} BYTES must have shape [N], got {shape}")
        if raw is not None:
            return list(split_bytes_tensor(raw, shape[0]))
        items = list(elements or ())
        if len(items) != shape[0]:
            raise InvalidRequest(
                f"input {INPUT!r}: shape says {shape[0]} elements, data holds {len(items)}"
            )
        return [
            item if isinstance(item, bytes) else decode_base64_image(item, i)
            for i, item in enumerate(items)
        ]
    if datatype == "UINT8":
        if len(shape) != 4 or shape[3] not in (1, 3) or min(shape) < 1:
            raise InvalidRequest(
                f"input {INPUT!r} UINT8 must have shape [N, H, W, 3] (or C=1), got {shape}"
            )
        n, h, w, c = shape
        if raw is None:
            try:  # JSON: a flat (or nested) list of 0..255
                array = np.asarray(elements, dtype=np.int64).reshape(-1)
            except (TypeError, ValueError):
                raise InvalidRequest(f"input {INPUT!r}: UINT8 data must be integers") from None
            if array.size and (array.min() < 0 or array.max() > 255):
                raise InvalidRequest(f"input {INPUT!r}: UINT8 data must be in 0..255")
            raw = array.astype(np.uint8).tobytes()
        if len(raw) != n * h * w * c:
            raise InvalidRequest(
                f"input {INPUT!r}: shape {shape} needs {n * h * w * c} bytes, got {len(raw)}"
            )
        step = h * w * c
        return [Pixels(raw[i * step : (i + 1) * step], h, w, c) for i in range(n)]
    raise InvalidRequest(f"input {INPUT!r} must be BYTES or UINT8, got datatype {datatype!r}")


def requested_outputs(names: Sequence[str]) -> tuple[str, ...]:
    """The outputs a call asks for, in its order; every output when it names none."""
    if not names:
        return OUTPUTS
    for name in names:
        if name not in OUTPUTS:
            raise InvalidRequest(f"unknown output {name!r} (this model has {', '.join(OUTPUTS)})")
    return tuple(dict.fromkeys(names))
