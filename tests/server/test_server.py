"""The real server over real channels answers what a plain ONNX Runtime run gives."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from simclr_embed.client import EmbeddingClient
from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from tests.server.conftest import ServerThread, encode, photo, reference, serve_config

S = 32  # the tiny model's input size; its resize policy is a plain bicubic resize to S×S


def expected_input(img: Image.Image) -> np.ndarray:
    """What 'resize' means (CONTRACT §3 metadata), written out with Pillow directly."""
    return np.asarray(img.convert("RGB").resize((S, S), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> pb_grpc.EmbeddingServiceStub:
    return pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(server.target))


def test_model_info(stub: pb_grpc.EmbeddingServiceStub, tiny_onnx: Path) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    meta = ort.InferenceSession(str(tiny_onnx)).get_modelmeta().custom_metadata_map
    assert info.model_version == meta["simclr.model_version"]
    assert (info.arch, info.image_size) == ("resnet18", S)
    assert (info.feature_dimension, info.projection_dimension) == (512, 32)
    assert info.max_batch_size == 32
    assert list(info.providers) == ["CPUExecutionProvider"]


def test_jpeg_png_raw_match_a_direct_onnxruntime_run(
    stub: pb_grpc.EmbeddingServiceStub, reference_session: ort.InferenceSession
) -> None:
    pics = [photo(48, 40, seed=1), photo(40, 56, seed=2), photo(S, S, seed=3)]
    jpeg = encode(pics[0], "JPEG", quality=90)
    png = encode(pics[1], "PNG")
    raw = np.asarray(pics[2])
    request = pb.EmbedRequest(
        images=[
            pb.Image(encoded=jpeg),
            pb.Image(encoded=png),
            pb.Image(raw=pb.RawImage(pixels=raw.tobytes(), height=S, width=S, channels=3)),
        ],
        kind=pb.EMBEDDING_KIND_UNSPECIFIED,
    )
    response = stub.Embed(request, timeout=30)
    batch = np.stack(
        [expected_input(Image.open(io.BytesIO(jpeg))), expected_input(pics[1]), raw]
    )  # [3, S, S, 3]
    want = reference(reference_session, batch)
    got = np.array([e.values for e in response.embeddings], np.float32)
    assert response.kind == pb.EMBEDDING_KIND_FEATURES  # UNSPECIFIED is answered as FEATURES
    assert response.dimension == 512 and got.shape == (3, 512)
    np.testing.assert_allclose(got, want["features"], rtol=1e-5, atol=1e-5)

    request.kind = pb.EMBEDDING_KIND_PROJECTION
    request.l2_normalize = True
    response = stub.Embed(request, timeout=30)
    got = np.array([e.values for e in response.embeddings], np.float32)
    z = want["projection"] / np.linalg.norm(want["projection"], axis=1, keepdims=True)
    assert response.kind == pb.EMBEDDING_KIND_PROJECTION and response.dimension == 32
    np.testing.assert_allclose(got, z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_gray_raw_is_the_gray_picture_in_rgb(
    stub: pb_grpc.EmbeddingServiceStub, reference_session: ort.InferenceSession
) -> None:
    gray = np.asarray(photo(S, S, seed=4).convert("L"))  # [S, S]
    request = pb.EmbedRequest(
        images=[pb.Image(raw=pb.RawImage(pixels=gray.tobytes(), height=S, width=S, channels=1))]
    )
    got = np.array(stub.Embed(request, timeout=30).embeddings[0].values, np.float32)
    want = reference(reference_session, np.repeat(gray[None, :, :, None], 3, axis=3))
    np.testing.assert_allclose(got, want["features"][0], rtol=1e-5, atol=1e-5)


def test_concurrent_clients_get_what_sequential_calls_get(server: ServerThread) -> None:
    """Images batched with other callers' images come out as when embedded alone."""
    images = [np.asarray(photo(S, S, seed=10 + i)) for i in range(24)]
    with EmbeddingClient(server.target) as client:
        alone = np.stack([client.embed([img])[0] for img in images])  # one image per request
        results: dict[int, np.ndarray] = {}

        def worker(k: int) -> None:  # 6 threads × 4 requests of 1-3 images, all at once
            for j in range(4):
                idx = [(k * 4 + j + m) % len(images) for m in range(1 + (k + j) % 3)]
                results[k * 4 + j] = (np.array(idx), client.embed([images[i] for i in idx]))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(results) == 24
    for idx, got in results.values():
        np.testing.assert_allclose(got, alone[idx], rtol=1e-5, atol=1e-5)
    batch_sizes = server.server.metrics.batch_size.collect()[0].samples
    count = next(s.value for s in batch_sizes if s.name == "simclr_batch_size_count")
    total = next(s.value for s in batch_sizes if s.name == "simclr_batch_size_sum")
    assert total > count  # some model calls really did merge several requests


def test_client_chunks_large_lists_and_keeps_order(
    server: ServerThread, reference_session: ort.InferenceSession, tmp_path: Path
) -> None:
    pics = [photo(S, S, seed=30 + i) for i in range(11)]
    paths = []
    for i, pic in enumerate(pics[:4]):
        paths.append(tmp_path / f"{i}.png")
        pic.save(paths[-1])
    mixed = [*paths, encode(pics[4], "PNG"), pics[5], *[np.asarray(p) for p in pics[6:]]]
    with EmbeddingClient(server.target, max_batch=3) as client:
        got = client.embed(mixed, kind="projection", concurrency=2)
        empty = client.embed([])
    want = reference(reference_session, np.stack([np.asarray(p) for p in pics]))["projection"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert empty.shape == (0, 512)


def test_async_client(server: ServerThread, reference_session: ort.InferenceSession) -> None:
    import asyncio

    from simclr_embed.client import AsyncEmbeddingClient

    pics = [np.asarray(photo(S, S, seed=50 + i)) for i in range(5)]

    async def main() -> np.ndarray:
        async with AsyncEmbeddingClient(server.target, max_batch=2) as client:
            assert (await client.model_info())["image_size"] == S
            return await client.embed(pics, normalize=True, concurrency=3)

    got = asyncio.run(main())
    want = reference(reference_session, np.stack(pics))["features"]
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_health_and_reflection(server: ServerThread) -> None:
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "simclr.v1.EmbeddingService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(
        refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"simclr.v1.EmbeddingService", "grpc.health.v1.Health"} <= names
    # A reflection client can also fetch the schema (what `grpcurl describe` does).
    answers = list(
        refl.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="simclr.v1.EmbeddingService"
                    )
                ]
            ),
            timeout=10,
        )
    )
    assert answers[0].file_descriptor_response.file_descriptor_proto


def test_model_calls_on_the_loop_answer_the_same(
    tiny_onnx: Path, reference_session: ort.InferenceSession
) -> None:
    """``--model-calls loop`` (what auto picks for do-nothing models): no thread hop, the same
    vectors under concurrent callers, and the server stays responsive."""
    srv = ServerThread(serve_config(tiny_onnx, model_calls="loop"))
    try:
        assert srv.server._batcher is not None and srv.server._batcher.inline
        images = np.stack([np.asarray(photo(S, S, seed=40 + i)) for i in range(12)])
        want = reference(reference_session, images)["features"]
        got: dict[int, np.ndarray] = {}
        with EmbeddingClient(srv.target) as client:

            def worker(k: int) -> None:
                got[k] = client.embed(list(images[k * 3 : k * 3 + 3]))

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            big = client.embed(list(np.concatenate([images] * 4)))  # 48 > 32: split
        for k in range(4):
            np.testing.assert_allclose(got[k], want[k * 3 : k * 3 + 3], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(big, np.concatenate([want] * 4), rtol=1e-5, atol=1e-5)
    finally:
        srv.close()
