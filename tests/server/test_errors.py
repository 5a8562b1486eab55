"""Bad input and overload are answered with CONTRACT §4 status codes; the server stays SERVING."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from tests.server.conftest import ServerThread, encode, photo, reference, serve_config
from tests.server.test_images import png_claiming

S = 32
INVALID = grpc.StatusCode.INVALID_ARGUMENT
GOOD = pb.Image(encoded=encode(photo(40, 40), "PNG"))


def raw(pixels: bytes, h: int, w: int, c: int) -> pb.Image:
    return pb.Image(raw=pb.RawImage(pixels=pixels, height=h, width=w, channels=c))


_jpeg = encode(photo(64, 64, seed=5), "JPEG", quality=90)

BAD = {
    "empty request": (pb.EmbedRequest(), "no images"),
    "image without data": (pb.EmbedRequest(images=[pb.Image()]), "image 0: neither"),
    "empty bytes": (
        pb.EmbedRequest(images=[GOOD, pb.Image(encoded=b"")]),
        "image 1: empty image bytes",
    ),
    "random bytes": (
        pb.EmbedRequest(images=[GOOD, GOOD, pb.Image(encoded=np.random.default_rng(0).bytes(500))]),
        "image 2: not a JPEG/PNG",
    ),
    "truncated JPEG": (
        pb.EmbedRequest(images=[pb.Image(encoded=_jpeg[: len(_jpeg) // 2])]),
        "image 0: cannot decode JPEG",
    ),
    "PNG header claiming 100k x 100k": (
        pb.EmbedRequest(images=[pb.Image(encoded=png_claiming(100_000, 100_000))]),
        "image 0: too many pixels",
    ),
    "PNG header claiming 64 MP": (
        pb.EmbedRequest(images=[GOOD, pb.Image(encoded=png_claiming(8_000, 8_000))]),
        "image 1: image is 8000x8000 = 64000000 pixels, over the limit",
    ),
    "raw wrong length": (
        pb.EmbedRequest(images=[raw(b"\0" * 47, 4, 4, 3)]),
        "image 0: raw image has 47 bytes",
    ),
    "raw 2 channels": (
        pb.EmbedRequest(images=[raw(b"\0" * 32, 4, 4, 2)]),
        "image 0: raw image has 2 channels",
    ),
    "raw too many pixels": (
        pb.EmbedRequest(images=[raw(b"", 10_000, 10_000, 3)]),
        "image 0: image is 10000x10000",
    ),
    "unknown kind": (pb.EmbedRequest(images=[GOOD], kind=7), "unknown embedding kind 7"),
    "too many images": (
        pb.EmbedRequest(images=[raw(b"\0" * 3, 1, 1, 3)] * 1025),
        "at most 1024 per request",
    ),
}


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> pb_grpc.EmbeddingServiceStub:
    return pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(server.target))


def assert_serving(target: str) -> None:
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    status = health.Check(
        health_pb2.HealthCheckRequest(service="simclr.v1.EmbeddingService"), timeout=10
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_invalid_argument_naming_the_image(
    case: str, stub: pb_grpc.EmbeddingServiceStub, server: ServerThread
) -> None:
    request, message = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(request, timeout=30)
    assert err.value.code() == INVALID
    assert message in err.value.details()
    assert_serving(server.target)
    assert len(stub.Embed(pb.EmbedRequest(images=[GOOD]), timeout=30).embeddings) == 1


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((S, S), Image.Resampling.BICUBIC))


def _accepted() -> Iterator[tuple[str, bytes, np.ndarray]]:
    """Unusual but valid images, with the model input each must become (written out by hand)."""
    gray16 = (np.linspace(0, 65535, 40 * 48).reshape(40, 48)).astype(np.uint16)
    gray8 = (gray16.astype(np.float64) * (255 / 65535)).astype(np.uint8)
    yield (
        "16-bit PNG",
        encode(Image.fromarray(gray16), "PNG"),
        _rgb(Image.fromarray(gray8).convert("RGB")),
    )
    cmyk = encode(photo(40, 48, seed=6).convert("CMYK"), "JPEG", quality=95)
    yield "CMYK JPEG", cmyk, _rgb(Image.open(io.BytesIO(cmyk)).convert("RGB"))
    rgba = np.dstack([np.asarray(photo(40, 40, seed=7)), np.zeros((40, 40), np.uint8)])
    rgba[:20, :, 3] = 255  # top half opaque, bottom half fully transparent → white
    flat = rgba[:, :, :3].copy()
    flat[20:] = 255
    yield "RGBA PNG", encode(Image.fromarray(rgba), "PNG"), _rgb(Image.fromarray(flat))
    pic = photo(36, 44, seed=8)
    for fmt in ("BMP", "TIFF", "GIF", "WEBP"):
        data = encode(pic, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        yield fmt, data, _rgb(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("case", [name for name, _, _ in _accepted()])
def test_unusual_images_are_converted_to_rgb(
    case: str, stub: pb_grpc.EmbeddingServiceStub, reference_session: ort.InferenceSession
) -> None:
    data, want_input = next((d, w) for name, d, w in _accepted() if name == case)
    got = stub.Embed(pb.EmbedRequest(images=[pb.Image(encoded=data)]), timeout=30)
    want = reference(reference_session, want_input[None])["features"]
    np.testing.assert_allclose(np.array(got.embeddings[0].values), want[0], rtol=1e-5, atol=1e-5)


def test_a_bad_request_does_not_fail_concurrent_good_ones(
    stub: pb_grpc.EmbeddingServiceStub,
) -> None:
    good = [stub.Embed.future(pb.EmbedRequest(images=[GOOD] * 3), timeout=30) for _ in range(4)]
    bad = [stub.Embed.future(BAD["random bytes"][0], timeout=30) for _ in range(4)]
    for fut in good:
        assert len(fut.result().embeddings) == 3
    for fut in bad:
        assert fut.code() == INVALID


def _wait_queued(server: ServerThread, n: int) -> None:
    for _ in range(500):
        if server.server.metrics.registry.get_sample_value("simclr_queue_images") == n:
            return
        time.sleep(0.01)
    raise AssertionError(f"queue never held {n} images")


def test_queue_full_deadline_and_drain(tiny_onnx: Path) -> None:
    """A long max delay holds a request in the queue; meanwhile: overflow, a deadline, a drain."""
    srv = ServerThread(
        serve_config(
            tiny_onnx,
            max_batch_size=64,
            max_delay_ms=1500,
            max_queue=4,
            max_message_mb=1,
            batching="delay",  # so that a partial batch waits in the queue
        )
    )
    try:
        stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(srv.target))
        with pytest.raises(grpc.RpcError) as err:  # over --max-message-mb: refused by gRPC itself
            stub.Embed(pb.EmbedRequest(images=[raw(b"\0" * 1_500_000, 500, 1000, 3)]), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        held = stub.Embed.future(pb.EmbedRequest(images=[GOOD] * 3), timeout=30)
        _wait_queued(srv, 3)
        with pytest.raises(grpc.RpcError) as err:  # 3 + 2 > 4: refused at once
            stub.Embed(pb.EmbedRequest(images=[GOOD] * 2), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # fits, but cannot wait out the delay
            stub.Embed(pb.EmbedRequest(images=[GOOD]), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_queued(srv, 3)  # the expired request left the queue

        # Drain while `held` is still waiting: it is answered, new calls are not.
        stopping = srv.call_soon(srv.server.stop(10.0))
        time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(pb.EmbedRequest(images=[GOOD]), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(held.result(timeout=30).embeddings) == 3
        stopping.result(timeout=30)
        codes = srv.server.metrics.request_counts()
        assert codes["OK"] == 1 and codes["RESOURCE_EXHAUSTED"] == 1
    finally:
        srv.close()


def test_not_serving_and_unavailable_until_the_model_is_warm(tiny_onnx: Path) -> None:
    """Health says NOT_SERVING and Embed says UNAVAILABLE while the (real) model load is held."""
    import asyncio
    import threading

    from simclr_embed.server.app import EmbeddingServer

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gate = threading.Event()

    async def make() -> EmbeddingServer:
        return EmbeddingServer(serve_config(tiny_onnx))

    srv = asyncio.run_coroutine_threadsafe(make(), loop).result(30)
    real_load = srv._load_model

    def held_load():  # runs in a worker thread, like the real load
        assert gate.wait(30)
        return real_load()

    srv._load_model = held_load  # type: ignore[method-assign]
    starting = asyncio.run_coroutine_threadsafe(srv.start(), loop)
    try:
        for _ in range(500):
            if srv.port:
                break
            time.sleep(0.01)
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="simclr.v1.EmbeddingService")
        for _ in range(500):  # the port is bound just before the server starts answering
            try:
                status = health.Check(check, timeout=5).status
                break
            except grpc.RpcError:
                time.sleep(0.01)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for call, request in (
            (stub.Embed, pb.EmbedRequest(images=[GOOD])),
            (stub.GetModelInfo, pb.GetModelInfoRequest()),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        gate.set()
        starting.result(60)
        assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        assert len(stub.Embed(pb.EmbedRequest(images=[GOOD]), timeout=30).embeddings) == 1
    finally:
        gate.set()
        asyncio.run_coroutine_threadsafe(srv.stop(1.0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
