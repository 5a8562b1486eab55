"""Per-image errors: a bad image costs its own slot, batch-mates are embedded as usual — in the
proto (``per_image_errors``), the client (``on_error="skip"``, ``embed_iter``) and asyncio."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from simclr_embed.client import AsyncEmbeddingClient, EmbeddingClient, EmbedResult
from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from tests.server.conftest import ServerThread, encode, photo, reference

S = 32
GARBAGE = b"\x00not an image at all" * 10
_jpeg = encode(photo(64, 64, seed=5), "JPEG", quality=90)
TRUNCATED = _jpeg[: len(_jpeg) // 2]


def _pixels(seed: int) -> np.ndarray:
    return np.asarray(photo(S, S, seed=seed))  # [S, S, 3]: raw, no resize: an exact reference


def _raw(arr: np.ndarray) -> pb.Image:
    return pb.Image(raw=pb.RawImage(pixels=arr.tobytes(), height=S, width=S, channels=3))


def test_proto_per_image_errors(
    server: ServerThread, reference_session: ort.InferenceSession
) -> None:
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(server.target))
    good = [_pixels(1), _pixels(2), _pixels(3)]
    images = [_raw(good[0]), pb.Image(encoded=GARBAGE), _raw(good[1]), pb.Image(encoded=TRUNCATED), _raw(good[2])]  # fmt: skip
    request = pb.EmbedRequest(
        images=images, kind=pb.EMBEDDING_KIND_PROJECTION, per_image_errors=True
    )
    before = server.server.metrics.images._value.get()
    response = stub.Embed(request, timeout=30)
    assert len(response.embeddings) == 5 and response.dimension == 32
    assert [len(e.values) for e in response.embeddings] == [32, 0, 32, 0, 32]
    assert [(e.index, e.reason.split(" ")[0]) for e in response.errors] == [
        (1, "not"),
        (3, "cannot"),
    ]
    got = np.array([response.embeddings[i].values for i in (0, 2, 4)], np.float32)
    want = reference(reference_session, np.stack(good))["projection"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert server.server.metrics.images._value.get() - before == 3  # bad ones are not "embedded"
    # Every image bad: still an answer, nothing run.
    request = pb.EmbedRequest(images=[pb.Image(encoded=GARBAGE)] * 2, per_image_errors=True)
    response = stub.Embed(request, timeout=30)
    assert response.dimension == 512 and [e.index for e in response.errors] == [0, 1]
    assert all(len(e.values) == 0 for e in response.embeddings)
    # Callers that don't ask see no change: the request fails, naming the image.
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.EmbedRequest(images=images), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("image 1: ")


def test_client_skip_and_iter(
    server: ServerThread, reference_session: ort.InferenceSession, tmp_path: Path
) -> None:
    good = [_pixels(10 + i) for i in range(7)]
    items = [good[0], GARBAGE, good[1], tmp_path / "missing.jpg", good[2], good[3],
             np.zeros((4, 4, 2), np.uint8), good[4], TRUNCATED, good[5], good[6]]  # fmt: skip
    want = reference(reference_session, np.stack(good))["features"]
    ok_at = [0, 2, 4, 5, 7, 9, 10]
    with EmbeddingClient(server.target, max_batch=3) as client:
        result = client.embed(items, on_error="skip", concurrency=2)
        assert isinstance(result, EmbedResult)
        assert result.indices.tolist() == ok_at
        np.testing.assert_allclose(result.vectors, want, rtol=1e-5, atol=1e-5)
        assert [f.index for f in result.failures] == [1, 3, 6, 8]
        assert "cannot read file" in result.failures[1].reason
        assert "arrays must be" in result.failures[2].reason

        pulled = []

        def lazily():
            for i, item in enumerate(items * 20):  # 220 inputs
                pulled.append(i)
                yield item

        stream = client.embed_iter(lazily(), on_error="skip", concurrency=2)
        first = next(stream)
        assert first.start == 0 and len(pulled) <= 3 * 4  # not read ahead beyond the window
        batches = [first, *stream]
        assert [b.start for b in batches] == sorted(b.start for b in batches)
        assert sum(b.count for b in batches) == 220
        indices = np.concatenate([b.indices for b in batches])
        assert indices.tolist() == [k * 11 + i for k in range(20) for i in ok_at]
        # The default still raises at the first bad one, naming it.
        with pytest.raises(Exception) as err:
            client.embed(items)
        assert getattr(err.value, "index", None) == 1 or isinstance(
            err.value, (OSError, ValueError)
        )


def test_async_client_skip(server: ServerThread, reference_session: ort.InferenceSession) -> None:
    good = [_pixels(30), _pixels(31)]

    async def main() -> EmbedResult:
        async with AsyncEmbeddingClient(server.target, max_batch=2) as client:
            return await client.embed([good[0], GARBAGE, good[1]], on_error="skip", concurrency=2)

    result = asyncio.run(main())
    assert result.indices.tolist() == [0, 2] and [f.index for f in result.failures] == [1]
    want = reference(reference_session, np.stack(good))["features"]
    np.testing.assert_allclose(result.vectors, want, rtol=1e-5, atol=1e-5)
