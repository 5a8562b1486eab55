"""``--http-port``: OpenAI-style /v1/embeddings (the real ``openai`` SDK, curl) and the Open
Inference Protocol over HTTP (JSON and binary) on a real server, checked against ``simclr.v1``
and a plain ONNX Runtime session; errors, token, TLS and metrics on the HTTP port."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from simclr_embed.client import EmbeddingClient
from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from tests.server.conftest import ServerThread, encode, photo, reference, serve_config
from tests.server.test_errors import _wait_queued
from tests.server.test_security import _self_signed

S = 32
JPEGS = [encode(photo(40 + 7 * i, 36, seed=i), "JPEG", quality=90) for i in range(4)]


def data_uri(image: bytes, kind: str = "jpeg") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(image).decode()


def call(
    url: str, body: object = None, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP call with the standard library: (status, headers, body), errors included."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture(scope="module")
def http_server(tiny_onnx: Path) -> Iterator[ServerThread]:
    srv = ServerThread(serve_config(tiny_onnx, http_port=0, max_message_mb=1))
    yield srv
    srv.close()


def base(srv: ServerThread) -> str:
    return f"http://127.0.0.1:{srv.server.http_port}"


def v1_embed(srv: ServerThread, images: list[bytes], kind: str = "features") -> np.ndarray:
    with EmbeddingClient(srv.target) as client:
        return client.embed(images, kind=kind)


def test_openai_sdk_unchanged_matches_simclr_v1(http_server: ServerThread) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=base(http_server) + "/v1", api_key="unused", max_retries=0)
    expected = v1_embed(http_server, JPEGS)  # [4, 512]
    uris = [data_uri(j) for j in JPEGS]
    # The SDK's default asks for base64 (little-endian float32) and decodes it itself.
    got = client.embeddings.create(model="simclr", input=uris)
    assert [d.index for d in got.data] == [0, 1, 2, 3] and got.model == "simclr"
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), expected, atol=1e-5)
    floats = client.embeddings.create(model="simclr", input=uris[1], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, expected[1], atol=1e-5)
    # dimensions picks the output of that size; kind/normalize are extensions (extra_body).
    proj = client.embeddings.create(model="simclr", input=uris[:2], dimensions=32)
    np.testing.assert_allclose(
        np.array([d.embedding for d in proj.data]),
        v1_embed(http_server, JPEGS[:2], "projection"),
        atol=1e-5,
    )
    unit = client.embeddings.create(
        model="simclr", input=uris[:2], extra_body={"kind": "projection", "normalize": True}
    )
    vectors = np.array([d.embedding for d in unit.data])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert [m.id for m in client.models.list().data] == ["simclr"]


def test_openai_errors_are_openai_error_objects(http_server: ServerThread) -> None:
    import openai

    client = openai.OpenAI(base_url=base(http_server) + "/v1", api_key="x", max_retries=0)
    bad = [data_uri(JPEGS[0]), data_uri(b"not an image"), data_uri(JPEGS[1])]
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="simclr", input=bad)
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert err.value.body["message"].startswith("image 1:")  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="gpt-4", input=bad[:1])
    with pytest.raises(openai.BadRequestError, match="not an output size"):
        client.embeddings.create(model="simclr", input=bad[:1], dimensions=100)
    cases = {
        "bare base64 that is not base64": {"model": "simclr", "input": ["%%%"]},
        "no input": {"model": "simclr", "input": []},
        "a URL, fetching off": {"model": "simclr", "input": ["https://example.com/a.jpg"]},
    }
    for name, body in cases.items():
        status, _, text = call(base(http_server) + "/v1/embeddings", body)
        assert status == 400, name
        assert json.loads(text)["error"]["code"] == "invalid_argument", name
    assert "--fetch-hosts" in json.loads(text)["error"]["message"]
    # A bad call costs nothing to the next one.
    ok = client.embeddings.create(model="simclr", input=bad[::2])
    assert len(ok.data) == 2


def test_curl_openai_and_v2_json(
    http_server: ServerThread, reference_session: ort.InferenceSession
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("needs curl")
    body = json.dumps({"model": "simclr", "input": data_uri(JPEGS[2])})
    out = subprocess.run(
        [curl, "-sS", "-H", "Content-Type: application/json", "-d", body,
         base(http_server) + "/v1/embeddings"],
        capture_output=True, check=True, timeout=30, text=True,
    )  # fmt: skip
    vector = json.loads(out.stdout)["data"][0]["embedding"]
    np.testing.assert_allclose(vector, v1_embed(http_server, JPEGS[2:3])[0], atol=1e-5)

    # V2 JSON with raw pixels: the model's own input, compared with ONNX Runtime directly.
    pixels = np.random.default_rng(3).integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    infer = {
        "id": "req-7",
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": [2, S, S, 3],
             "data": pixels.reshape(-1).tolist()}
        ],
        "outputs": [{"name": "projection"}],
    }  # fmt: skip
    out = subprocess.run(
        [curl, "-sS", "-d", json.dumps(infer), base(http_server) + "/v2/models/simclr/infer"],
        capture_output=True, check=True, timeout=30, text=True,
    )  # fmt: skip
    answer = json.loads(out.stdout)
    assert answer["id"] == "req-7" and answer["model_name"] == "simclr"
    [output] = answer["outputs"]
    assert output["name"] == "projection" and output["shape"] == [2, 32]
    got = np.array(output["data"], np.float32).reshape(2, 32)
    np.testing.assert_allclose(got, reference(reference_session, pixels)["projection"], atol=1e-4)


def test_v2_binary_extension_and_metadata(http_server: ServerThread) -> None:
    url = base(http_server)
    status, _, text = call(url + "/v2/models/simclr")
    meta = json.loads(text)
    assert status == 200 and meta["outputs"][0] == {
        "name": "features", "datatype": "FP32", "shape": [-1, 512]
    }  # fmt: skip
    version = meta["versions"][0]
    assert call(url + f"/v2/models/simclr/versions/{version}/ready")[0] == 200
    assert call(url + "/v2/models/simclr/versions/0000/ready")[0] == 404
    assert call(url + "/v2/models/other")[0] == 404
    assert call(url + "/v2/health/live")[0] == 200 and call(url + "/v2/health/ready")[0] == 200

    # BYTES input in binary form: <u4 length + bytes> per element, after the JSON header.
    blob = b"".join(struct.pack("<I", len(j)) + j for j in JPEGS)
    header = json.dumps(
        {
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [4],
                        "parameters": {"binary_data_size": len(blob)}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()  # fmt: skip
    status, headers, body = call(
        url + "/v2/models/simclr/infer",
        raw=header + blob,
        headers={"Inference-Header-Content-Length": str(len(header)),
                 "Content-Type": "application/octet-stream"},
    )  # fmt: skip
    assert status == 200, body
    split = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:split])
    assert answer["model_version"] == version
    sizes = [o["parameters"]["binary_data_size"] for o in answer["outputs"]]
    assert [o["name"] for o in answer["outputs"]] == ["features", "projection"]
    features = np.frombuffer(body[split : split + sizes[0]], "<f4").reshape(4, 512)
    projection = np.frombuffer(body[split + sizes[0] :], "<f4").reshape(4, 32)
    np.testing.assert_allclose(features, v1_embed(http_server, JPEGS), atol=1e-5)
    np.testing.assert_allclose(projection, v1_embed(http_server, JPEGS, "projection"), atol=1e-5)

    # A cut BYTES element and a bad image are 400 naming what is wrong.
    status, _, text = call(
        url + "/v2/models/simclr/infer",
        raw=header + blob[:-10],
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 400 and "binary_data_size" in json.loads(text)["error"]
    bad = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2],
                       "data": [base64.b64encode(JPEGS[0]).decode(), "bm9wZQ=="]}]}  # fmt: skip
    status, _, text = call(url + "/v2/models/simclr/infer", bad)
    assert status == 400 and json.loads(text)["error"].startswith("image 1:")


def test_413_and_metrics_by_protocol(http_server: ServerThread) -> None:
    url = base(http_server)
    big = {"model": "simclr", "input": [base64.b64encode(bytes(800_000)).decode()]}
    status, _, text = call(url + "/v1/embeddings", big)  # > --max-message-mb 1
    assert status == 413 and "--max-message-mb" in json.loads(text)["error"]["message"]
    status, _, text = call(url + "/metrics")
    assert status == 200
    samples = dict(
        line.rsplit(" ", 1) for line in text.decode().splitlines() if line.startswith("simclr_req")
    )
    key = 'simclr_requests_total{code="%s",protocol="%s"}'
    assert float(samples[key % ("RESOURCE_EXHAUSTED", "http-openai")]) >= 1
    for protocol in ("grpc", "v2-grpc", "http-openai", "v2-http"):
        assert key % ("OK", protocol) in samples  # created at zero for dashboards


def test_overload_deadline_and_drain_over_http(tiny_onnx: Path) -> None:
    """A request held in the queue; meanwhile 429 + Retry-After, 504, then a drain: 503."""
    srv = ServerThread(
        serve_config(
            tiny_onnx, http_port=0, max_batch_size=64, max_delay_ms=4000, max_queue=4,
            batching="delay",
        )
    )  # fmt: skip
    url = base(srv) + "/v1/embeddings"
    one = {"model": "simclr", "input": [data_uri(JPEGS[0])]}
    try:
        held: list[tuple[int, dict[str, str], bytes]] = []
        three = {"model": "simclr", "input": [data_uri(JPEGS[0])] * 3}
        thread = threading.Thread(target=lambda: held.append(call(url, three)))
        thread.start()
        _wait_queued(srv, 3)
        status, headers, text = call(url, {**one, "input": one["input"] * 2})
        assert status == 429 and headers["Retry-After"] == "1"
        assert "queue full" in json.loads(text)["error"]["message"]
        status, _, _ = call(url, one, headers={"Request-Timeout": "0.3"})
        assert status == 504
        v2 = base(srv) + "/v2/models/simclr/infer"
        body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                            "data": [base64.b64encode(JPEGS[0]).decode()]}],
                "parameters": {"timeout": 300_000}}  # fmt: skip
        assert call(v2, body)[0] == 504
        _wait_queued(srv, 3)

        stopping = srv.call_soon(srv.server.stop(10.0))
        time.sleep(0.2)
        status, headers, _ = call(url, one)
        assert status == 503 and headers["Retry-After"] == "1"
        assert call(base(srv) + "/v2/health/ready")[0] == 503
        thread.join(30)
        assert held[0][0] == 200 and len(json.loads(held[0][2])["data"]) == 3  # answered
        stopping.result(timeout=30)
        counts = srv.server.metrics.request_counts()
        assert counts["OK"] == 1 and counts["DEADLINE_EXCEEDED"] == 2
        assert counts["RESOURCE_EXHAUSTED"] == 1 and counts["UNAVAILABLE"] == 1
    finally:
        srv.close()


def test_token_and_tls_on_the_http_port(tiny_onnx: Path, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    srv = ServerThread(
        serve_config(tiny_onnx, http_port=0, auth_token="tok", tls_cert=cert, tls_key=key)
    )
    try:
        import ssl

        context = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{srv.server.http_port}"
        body = json.dumps({"model": "simclr", "input": [data_uri(JPEGS[0])]}).encode()

        def post(headers: dict[str, str]) -> int:
            request = urllib.request.Request(url + "/v1/embeddings", data=body, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30, context=context) as r:
                    return r.status
            except urllib.error.HTTPError as err:
                return err.code

        assert post({}) == 401 and post({"Authorization": "Bearer nope"}) == 401
        assert post({"Authorization": "Bearer tok"}) == 200
        with urllib.request.urlopen(url + "/v2/health/ready", timeout=30, context=context) as r:
            assert r.status == 200  # probes need no token
        with pytest.raises(OSError):  # plain HTTP on the TLS port: refused, connection closed
            urllib.request.urlopen(url.replace("https", "http") + "/v2/health/ready", timeout=5)
        # V2 over gRPC: the same token; its health calls are open.
        from simclr_embed.pb.inference import grpc_predict_v2_pb2 as v2
        from simclr_embed.pb.inference import grpc_predict_v2_pb2_grpc as v2_grpc

        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(srv.target, creds) as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelMetadata(v2.ModelMetadataRequest(name="simclr"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            meta = stub.ModelMetadata(
                v2.ModelMetadataRequest(name="simclr"),
                metadata=(("authorization", "Bearer tok"),),
                timeout=10,
            )
            assert [o.name for o in meta.outputs] == ["features", "projection"]
    finally:
        srv.close()


def test_v2_grpc_raw_contents_match_simclr_v1(http_server: ServerThread) -> None:
    """Our own stubs (tritonclient's are checked in test_http_clients, in another process)."""
    from simclr_embed.pb.inference import grpc_predict_v2_pb2 as v2
    from simclr_embed.pb.inference import grpc_predict_v2_pb2_grpc as v2_grpc

    blob = b"".join(struct.pack("<I", len(j)) + j for j in JPEGS)
    request = v2.ModelInferRequest(model_name="simclr", id="x")
    request.inputs.add(name="images", datatype="BYTES", shape=[4])
    request.outputs.add(name="features")
    request.raw_input_contents.append(blob)
    with grpc.insecure_channel(http_server.target) as channel:
        reply = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        v1 = pb_grpc.EmbeddingServiceStub(channel).Embed(
            pb.EmbedRequest(images=[pb.Image(encoded=j) for j in JPEGS], packed=True), timeout=30
        )
    assert reply.id == "x" and [o.name for o in reply.outputs] == ["features"]
    assert list(reply.outputs[0].shape) == [4, 512]
    got = np.frombuffer(reply.raw_output_contents[0], "<f4")
    assert got.tobytes() == v1.packed_embeddings  # the same model call, bit for bit


def test_http_port_in_use_is_a_clear_error(tiny_onnx: Path) -> None:
    import socket

    from simclr_embed.errors import SimclrError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SimclrError, match=r"cannot serve HTTP on 127\.0\.0\.1:\d+: address "
                           r"already in use .*--http-port"):  # fmt: skip
            ServerThread(serve_config(tiny_onnx, http_port=port))
