"""The servers a user would pick instead of ``simclr serve``, each written the way its own docs
recommend, serving the same ONNX model with the same preprocessing (for bench/peers.py; installed
only for the bench: ``pip install litserve 'ray[serve]'``).

    python bench/peer_servers.py litserve --model M.onnx --port P
    python bench/peer_servers.py rayserve --model M.onnx --port P

Both take ``POST {"images": [base64 JPEG, ...]}`` and answer ``{"embeddings": base64 of
little-endian float32 [n, D]}`` (features), batching concurrent requests up to 32 images' worth
of requests with a 2 ms wait — the settings ``simclr serve`` runs with by default. Each prints
``READY <port>`` on stderr once it answers.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_BATCH, WAIT_S = 32, 0.002


def _session_and_preprocessor(model: str):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    from simclr_embed.inference.images import Preprocessor

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    pre = Preprocessor(int(meta["simclr.image_size"]), meta.get("simclr.resize", "resize"))
    return session, pre


def _decode(pre, images: list[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.stack([pre.from_encoded(base64.b64decode(s)) for s in images])  # [n, S, S, 3]


def _answer(features: np.ndarray) -> dict[str, str]:
    return {"embeddings": base64.b64encode(np.asarray(features, "<f4").tobytes()).decode()}


def _announce(port: int, health: str | None = None) -> None:
    """``READY port`` on stderr, once ``health`` (if any) answers 200."""
    for _ in range(1200 if health else 0):
        try:
            with urllib.request.urlopen(health, timeout=1) as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        time.sleep(0.25)
    print(f"READY {port}", file=sys.stderr, flush=True)


try:  # a peer installed only for the bench; the class must live at module level (LitServe
    import litserve as ls  # pickles the API into its worker process)
except ImportError:  # pragma: no cover
    ls = None

if ls is not None:

    class EmbedAPI(ls.LitAPI):
        def __init__(self, model: str, **kwargs: object) -> None:
            super().__init__(**kwargs)
            self.model = model

        def setup(self, device: str) -> None:
            self.session, self.pre = _session_and_preprocessor(self.model)

        def decode_request(self, request: dict) -> np.ndarray:
            return _decode(self.pre, request["images"])

        def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
            return inputs  # requests of several images each: concatenated in predict

        def predict(self, x: list[np.ndarray]) -> list[np.ndarray]:
            sizes = np.cumsum([len(a) for a in x])[:-1]
            (features,) = self.session.run(["features"], {"images": np.concatenate(x)})
            return np.split(features, sizes)

        def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
            return output

        def encode_response(self, output: np.ndarray) -> dict[str, str]:
            return _answer(output)


def run_litserve(model: str, port: int) -> None:
    import threading

    if ls is None:
        raise SystemExit("litserve is not installed (pip install litserve)")
    # LitServe's worker processes outlive a SIGTERM to this one: a process group, ended whole.
    os.setpgrp()
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    api = EmbedAPI(model, max_batch_size=MAX_BATCH, batch_timeout=WAIT_S)
    server = ls.LitServer(api, accelerator="cpu", timeout=60)
    health = f"http://127.0.0.1:{port}/health"  # 200 once its inference worker is ready
    threading.Thread(target=_announce, args=(port, health), daemon=True).start()
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


def run_rayserve(model: str, port: int) -> None:
    import ray
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(max_ongoing_requests=256)
    class Embedder:
        def __init__(self) -> None:
            self.session, self.pre = _session_and_preprocessor(model)

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=WAIT_S)
        async def features(self, batches: list[np.ndarray]) -> list[np.ndarray]:
            sizes = np.cumsum([len(a) for a in batches])[:-1]
            (out,) = self.session.run(["features"], {"images": np.concatenate(batches)})
            return np.split(out, sizes)

        async def __call__(self, request: Request) -> dict[str, str]:
            body = await request.json()
            return _answer(await self.features(_decode(self.pre, body["images"])))

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Embedder.bind(), route_prefix="/predict")
        _announce(port)  # serve.run returns once the deployment is ready
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        while not stop:
            time.sleep(0.2)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("server", choices=("litserve", "rayserve"))
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    {"litserve": run_litserve, "rayserve": run_rayserve}[args.server](args.model, args.port)


if __name__ == "__main__":
    main()
