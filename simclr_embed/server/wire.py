"""``EmbedResponse.embeddings`` written straight in protobuf's wire format.

Building ``repeated Embedding { repeated float values }`` the ordinary way turns every value
into a Python float and back (``tolist`` then ``extend``): ~6 ms for 64 × 2048, a few times the
rest of the request. On the wire each row is just two length-prefixed headers and the row's
little-endian float32 bytes (``values`` is packed, proto3's default), so the rows are laid out
with numpy and parsed into the response in one ``MergeFromString`` — a copy in the C parser.
The message that comes out equals the ordinary one (tested); callers see no difference.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

_EMBEDDINGS_TAG = b"\x0a"  # EmbedResponse.embeddings = 1, length-delimited
_VALUES_TAG = b"\x0a"  # Embedding.values = 1, packed floats, length-delimited
_EMPTY = _EMBEDDINGS_TAG + b"\x00"  # an Embedding with no values (a left-out image)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def embeddings_wire(vectors: np.ndarray, n: int, missing: Collection[int] = ()) -> bytes:
    """The ``embeddings`` field of an ``EmbedResponse`` for ``n`` images: the rows of
    ``vectors`` ``[n - len(missing), D]`` in order, an empty ``Embedding`` at each ``missing``
    index. ``MergeFromString`` it into the response."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    d = rows.shape[1]
    inner = _VALUES_TAG + _varint(4 * d) if d else b""
    header = _EMBEDDINGS_TAG + _varint(len(inner) + 4 * d) + inner
    # [m, len(header) + 4D] bytes: every row's header, then its floats.
    framed = np.empty((len(rows), len(header) + 4 * d), np.uint8)
    framed[:, : len(header)] = np.frombuffer(header, np.uint8)
    framed[:, len(header) :] = rows.view(np.uint8).reshape(len(rows), 4 * d)
    if not missing:
        return framed.tobytes()
    parts, row = [], 0
    for i in range(n):
        if i in missing:
            parts.append(_EMPTY)
        else:
            parts.append(framed[row].tobytes())
            row += 1
    return b"".join(parts)
