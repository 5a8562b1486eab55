"""EmbedStream, packed vectors and per-stage timings against a real server: order, equality with
unary calls, backpressure, a bad message, per-image errors, cancel, drain, and the client's use
of the stream (with its fallback to unary calls on a server without it)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from simclr_embed.client import EmbeddingClient
from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from simclr_embed.server.streaming import WINDOW
from tests.server.conftest import ServerThread, photo, reference, serve_config

S = 32
GARBAGE = pb.Image(encoded=b"\x00 not an image" * 20)


def _raw(seed: int) -> tuple[np.ndarray, pb.Image]:
    arr = np.asarray(photo(S, S, seed=seed))
    return arr, pb.Image(raw=pb.RawImage(pixels=arr.tobytes(), height=S, width=S, channels=3))


def _vectors(response: pb.EmbedResponse) -> np.ndarray:
    if response.packed_embeddings:
        return np.frombuffer(response.packed_embeddings, "<f4").reshape(-1, response.dimension)
    return np.array([e.values for e in response.embeddings], np.float32)


def test_stream_answers_in_order_like_unary_calls(
    server: ServerThread, reference_session: ort.InferenceSession
) -> None:
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(server.target))
    messages, wants = [], []
    for m in range(12):
        pics = [_raw(100 + 10 * m + i) for i in range(1 + m % 4)]
        kind = pb.EMBEDDING_KIND_PROJECTION if m % 3 == 0 else pb.EMBEDDING_KIND_FEATURES
        messages.append(pb.EmbedRequest(images=[p for _, p in pics], kind=kind, packed=m % 2 == 0))
        ref = reference(reference_session, np.stack([a for a, _ in pics]))
        wants.append(ref["projection" if m % 3 == 0 else "features"])
    responses = list(stub.EmbedStream(iter(messages), timeout=60))
    assert len(responses) == 12
    for m, (response, want) in enumerate(zip(responses, wants, strict=True)):
        assert bool(response.packed_embeddings) == (m % 2 == 0)
        assert (len(response.embeddings) == 0) == (m % 2 == 0)
        np.testing.assert_allclose(_vectors(response), want, rtol=1e-5, atol=1e-5)
        assert response.timings.inference_ms > 0 and response.timings.decode_ms >= 0
    # The same request unary, both forms: the same numbers; the stage times in trailing metadata.
    unary, call = stub.Embed.with_call(messages[1], timeout=30)
    packed = stub.Embed(pb.EmbedRequest(images=messages[1].images, packed=True), timeout=30)
    np.testing.assert_array_equal(_vectors(unary), _vectors(packed))
    trailing = dict(call.trailing_metadata())
    assert {"simclr-decode-ms", "simclr-queue-ms", "simclr-inference-ms"} <= trailing.keys()
    assert float(trailing["simclr-inference-ms"]) > 0


def test_a_bad_message_ends_the_stream_naming_it_after_the_good_ones(server: ServerThread) -> None:
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(server.target))
    good = pb.EmbedRequest(images=[_raw(1)[1]])
    per_image = pb.EmbedRequest(images=[_raw(2)[1], GARBAGE], per_image_errors=True)
    bad = pb.EmbedRequest(images=[_raw(3)[1], GARBAGE])
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for response in stub.EmbedStream(iter([good, per_image, bad, good]), timeout=60):
            got.append(response)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("message 2: image 1: not a ")
    assert len(got) == 2 and [e.index for e in got[1].errors] == [1]  # per-image: stream goes on


class _Gate(threading.Event):
    """Set to let the held model calls go; ``entered`` counts the images they hold."""

    entered = 0


def _gated(srv: ServerThread) -> _Gate:
    """Hold every model call until the returned event is set (the batcher's encode, wrapped)."""
    gate = _Gate()
    batcher = srv.server._batcher
    assert batcher is not None
    assert not batcher.inline  # a held call on the event loop would hold the whole server
    real = batcher._encode

    def held(images: np.ndarray) -> dict[str, np.ndarray]:
        gate.entered += len(images)
        assert gate.wait(30)
        return real(images)

    batcher._encode = held
    return gate


def _wait(predicate, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end
        time.sleep(0.01)


def test_backpressure_cancel_frees_the_queue(tiny_onnx: Path) -> None:
    srv = ServerThread(
        serve_config(tiny_onnx, max_batch_size=8, max_queue=4096, model_calls="threads")
    )
    try:
        gate = _gated(srv)
        batcher = srv.server._batcher
        stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(srv.target))
        message = pb.EmbedRequest(images=[_raw(i)[1] for i in range(16)])
        call = stub.EmbedStream(iter([message] * 100), timeout=60)
        pool = concurrent.futures.ThreadPoolExecutor(1)
        first = pool.submit(next, call)
        _wait(lambda: batcher.queued_images > 0)
        time.sleep(1.0)  # the model is held: the server reads no further than its window
        queued = batcher.queued_images + 8 * batcher.inflight_batches
        assert queued <= (WINDOW + 2) * 16, queued  # not 100 messages' worth
        call.cancel()  # cancelling the stream drops its queued work
        _wait(lambda: batcher.queued_images == 0)
        gate.set()
        with pytest.raises(grpc.RpcError):
            first.result(30)
        pool.shutdown()
    finally:
        srv.close()


def test_drain_answers_what_was_read_then_ends_unavailable(tiny_onnx: Path) -> None:
    srv = ServerThread(
        serve_config(tiny_onnx, max_batch_size=4, drain_delay_s=0.0, model_calls="threads")
    )
    try:
        gate = _gated(srv)
        stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(srv.target))
        sent = threading.Event()

        def messages() -> Iterator[pb.EmbedRequest]:
            for i in range(3):
                yield pb.EmbedRequest(images=[_raw(i)[1]])
            sent.set()
            time.sleep(2.0)  # the stream stays open; more would come
            for i in range(3, 6):
                yield pb.EmbedRequest(images=[_raw(i)[1]])

        got: list[pb.EmbedResponse] = []

        def consume() -> grpc.RpcError | None:
            try:
                for response in stub.EmbedStream(messages(), timeout=60):
                    got.append(response)
            except grpc.RpcError as exc:
                return exc
            return None

        pool = concurrent.futures.ThreadPoolExecutor(1)
        result = pool.submit(consume)
        assert sent.wait(10)
        batcher = srv.server._batcher
        # all three messages read by the server: held in the model or queued behind it
        _wait(lambda: gate.entered + batcher.queued_images == 3)
        stopping = srv.call_soon(srv.server.stop(10.0))
        time.sleep(0.3)
        gate.set()  # the messages read before the drain are answered ...
        exc = result.result(30)
        stopping.result(30)
        assert len(got) == 3
        assert exc is not None and exc.code() == grpc.StatusCode.UNAVAILABLE  # ... then this
        assert "resend from message 3" in exc.details()
        pool.shutdown()
    finally:
        srv.close()


class _UnaryOnly(pb_grpc.EmbeddingServiceServicer):
    """An older server: Embed and GetModelInfo only (EmbedStream is UNIMPLEMENTED)."""

    def __init__(self, target: str) -> None:
        self.stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(target))

    def Embed(self, request, context):
        return self.stub.Embed(request, timeout=30)

    def GetModelInfo(self, request, context):
        return self.stub.GetModelInfo(request, timeout=30)


def test_client_stream_equals_unary_and_falls_back(server: ServerThread, tmp_path: Path) -> None:
    paths = []
    for i in range(23):
        paths.append(tmp_path / f"{i}.png")
        photo(40, 36, seed=200 + i).save(paths[-1])
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    items = [*paths[:10], tmp_path / "bad.jpg", *paths[10:]]
    with EmbeddingClient(server.target, max_batch=4) as client:
        unary = client.embed(items, on_error="skip")
        streamed = list(client.embed_iter(items, on_error="skip", stream=True, concurrency=2))
    assert [b.start for b in streamed] == sorted(b.start for b in streamed)
    np.testing.assert_array_equal(np.concatenate([b.vectors for b in streamed]), unary.vectors)
    assert [f.index for b in streamed for f in b.failures] == [10]
    assert all(b.timings is not None for b in streamed)
    old = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    pb_grpc.add_EmbeddingServiceServicer_to_server(_UnaryOnly(server.target), old)
    port = old.add_insecure_port("127.0.0.1:0")
    old.start()
    try:
        with EmbeddingClient(f"127.0.0.1:{port}", max_batch=4) as client:
            fallback = list(client.embed_iter(items, on_error="skip", stream=True))
    finally:
        old.stop(0)
    np.testing.assert_array_equal(np.concatenate([b.vectors for b in fallback]), unary.vectors)
