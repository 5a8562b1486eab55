"""Run by tests/server/test_http_clients.py in its own process: the real ``tritonclient`` (HTTP
and gRPC) against a running ``simclr serve --http-port``. Its gRPC stubs define the same
``inference.*`` protobuf names as ours, and one process cannot register both.

    python triton_calls.py HTTP_PORT GRPC_PORT OUT.npz IMAGE...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException


def main() -> None:
    http_port, grpc_port, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    files = np.array([Path(p).read_bytes() for p in sys.argv[4:]], dtype=np.object_)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    results: dict[str, np.ndarray] = {"pixels": pixels}
    facts: dict[str, object] = {}

    h = thttp.InferenceServerClient(f"127.0.0.1:{http_port}")
    facts["http_ready"] = h.is_server_live() and h.is_server_ready() and h.is_model_ready("simclr")
    facts["http_outputs"] = [o["name"] for o in h.get_model_metadata("simclr")["outputs"]]
    for binary in (True, False):
        inp = thttp.InferInput("images", [len(files)], "BYTES")
        inp.set_data_from_numpy(files, binary_data=True)
        res = h.infer(
            "simclr", [inp], outputs=[thttp.InferRequestedOutput("features", binary_data=binary)]
        )
        results[f"http_features_{binary}"] = res.as_numpy("features")
    inp = thttp.InferInput("images", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=True)
    results["http_pixels_projection"] = h.infer("simclr", [inp]).as_numpy("projection")
    bad = thttp.InferInput("images", [2], "BYTES")
    bad.set_data_from_numpy(np.array([files[0], b"junk"], dtype=np.object_), binary_data=True)
    try:
        h.infer("simclr", [bad])
    except InferenceServerException as exc:
        facts["http_bad"] = [exc.status(), exc.message()]

    g = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    facts["grpc_ready"] = g.is_server_live() and g.is_server_ready() and g.is_model_ready("simclr")
    facts["grpc_version"] = g.get_model_metadata("simclr").versions[0]
    inp = tgrpc.InferInput("images", [len(files)], "BYTES")
    inp.set_data_from_numpy(files)
    res = g.infer("simclr", [inp], outputs=[tgrpc.InferRequestedOutput("features")])
    results["grpc_features"] = res.as_numpy("features")
    inp = tgrpc.InferInput("images", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    results["grpc_pixels_projection"] = g.infer("simclr", [inp]).as_numpy("projection")
    bad = tgrpc.InferInput("images", [2], "BYTES")
    bad.set_data_from_numpy(np.array([files[0], b"junk"], dtype=np.object_))
    try:
        g.infer("simclr", [bad])
    except InferenceServerException as exc:
        facts["grpc_bad"] = [exc.status(), exc.message()]
    np.savez(out, **results)
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
