"""The clients platform teams already have, unchanged, against a real ``simclr serve`` process:
``tritonclient`` over HTTP (binary and JSON) and gRPC, then SIGTERM draining every protocol."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from simclr_embed.client import EmbeddingClient
from simclr_embed.pb.inference import grpc_predict_v2_pb2 as v2
from simclr_embed.pb.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from tests.server.conftest import ServerProcess, encode, photo, reference
from tests.server.test_http import call

HERE = Path(__file__).parent


def http_port_of(server: ServerProcess) -> int:
    found = re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", server.log)
    assert found, server.log
    return int(found.group(1))


def test_tritonclient_http_and_grpc_then_sigterm_drains_every_protocol(
    tiny_onnx: Path, tmp_path: Path, reference_session: ort.InferenceSession
) -> None:
    pytest.importorskip("tritonclient.http")
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(encode(photo(48, 40 + 8 * i, seed=i), "JPEG", quality=90))
    server = ServerProcess(
        "--model", str(tiny_onnx), "--port", "0", "--http-port", "0", "--device", "cpu",
        "--drain-delay-s", "2", "--grace-s", "5",
    )  # fmt: skip
    try:
        grpc_port = server.wait_serving()
        http_port = http_port_of(server)
        out = tmp_path / "triton.npz"
        run = subprocess.run(
            [sys.executable, str(HERE / "triton_calls.py"), str(http_port), str(grpc_port),
             str(out), *map(str, paths)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        facts = json.loads(run.stdout.splitlines()[-1])
        got = np.load(out)
        with EmbeddingClient(f"127.0.0.1:{grpc_port}") as client:
            expected = client.embed([p.read_bytes() for p in paths])  # simclr.v1, [3, 512]
            version = client.model_info()["model_version"]
        assert facts["http_ready"] and facts["grpc_ready"]
        assert facts["http_outputs"] == ["features", "projection"]
        assert facts["grpc_version"] == version
        for key in ("http_features_True", "http_features_False", "grpc_features"):
            np.testing.assert_allclose(got[key], expected, atol=1e-5, err_msg=key)
        projection = reference(reference_session, got["pixels"])["projection"]
        for key in ("http_pixels_projection", "grpc_pixels_projection"):
            np.testing.assert_allclose(got[key], projection, atol=1e-4, err_msg=key)
        assert facts["http_bad"][0] == "400" and facts["http_bad"][1].startswith("image 1:")
        assert facts["grpc_bad"][0] == "StatusCode.INVALID_ARGUMENT"
        assert facts["grpc_bad"][1].startswith("image 1:")

        # SIGTERM: for --drain-delay-s every protocol refuses new calls, retryably.
        server.terminate()
        url = f"http://127.0.0.1:{http_port}"
        body = {"model": "simclr", "input": [base64.b64encode(paths[0].read_bytes()).decode()]}
        deadline = time.monotonic() + 10
        while call(url + "/v2/health/ready")[0] == 200:  # the signal is on its way
            assert time.monotonic() < deadline
            time.sleep(0.02)
        status, headers, _ = call(url + "/v1/embeddings", body)
        assert status == 503 and headers["Retry-After"] == "1"
        request = v2.ModelInferRequest(model_name="simclr")
        request.inputs.add(
            name="images", datatype="BYTES", shape=[1]
        ).contents.bytes_contents.append(paths[0].read_bytes())
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            assert not stub.ServerReady(v2.ServerReadyRequest(), timeout=5).ready
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.wait(30) == 0
    finally:
        server.kill()
