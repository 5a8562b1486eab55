"""``simclr serve`` on each of its protocols beside the servers a user would pick instead, same
model, same JPEGs, same clients, one run (results: docs/benchmarks.md "Serving: peers").

    .venv/bin/python bench/peers.py                       # resnet18 @ 64 px and the noop model
    .venv/bin/python bench/peers.py --seconds 2 --clients 1,64 --models noop

Servers (each a process of its own on 127.0.0.1, started and stopped in turn):
  simclr-v1        simclr serve, simclr.v1 Embed over gRPC, packed answers
  simclr-v2-grpc   the same process, inference.GRPCInferenceService ModelInfer, raw contents
  simclr-v2-http   the same process, V2 /infer over HTTP with the binary-data extension
  simclr-openai    the same process, OpenAI-style /v1/embeddings, base64 in and out
  litserve         LitServe, batching (max_batch_size 32, batch_timeout 2 ms)   [bench/peer_servers.py]
  rayserve         Ray Serve, @serve.batch (32, 2 ms), its HTTP proxy          [bench/peer_servers.py]
Load: closed-loop clients (grpc.aio / aiohttp) in this process, 1 or 16 JPEGs per request,
--seconds per cell after a short warm-up: images/s, p50, p99. Every server's answer for one
image is first checked against simclr-v1's (same model, same preprocessing).
Peers need `pip install litserve "ray[serve]"`; a missing one is reported and skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import aiohttp  # noqa: E402
import grpc  # noqa: E402
from serve import build_model, load_photos, start_process, stop_process  # noqa: E402
from serve_overhead import noop_model  # noqa: E402

from simclr_embed.pb.inference import grpc_predict_v2_pb2 as v2  # noqa: E402
from simclr_embed.pb.inference import grpc_predict_v2_pb2_grpc as v2_grpc  # noqa: E402
from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb  # noqa: E402
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc  # noqa: E402

OURS = ("simclr-v1", "simclr-v2-grpc", "simclr-v2-http", "simclr-openai")
PEERS = ("litserve", "rayserve")
Call = Callable[[list[bytes]], Awaitable[np.ndarray]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_call(
    server: str, port: int, channel: grpc.aio.Channel | None, http: aiohttp.ClientSession
) -> Call:
    """One request of the given images → features ``[n, D]``, the way each server is called."""
    if server == "simclr-v1":
        stub = pb_grpc.EmbeddingServiceStub(channel)

        async def v1(images: list[bytes]) -> np.ndarray:
            reply = await stub.Embed(
                pb.EmbedRequest(images=[pb.Image(encoded=j) for j in images], packed=True)
            )
            return np.frombuffer(reply.packed_embeddings, "<f4").reshape(len(images), -1)

        return v1
    if server == "simclr-v2-grpc":
        infer = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer

        async def v2g(images: list[bytes]) -> np.ndarray:
            request = v2.ModelInferRequest(model_name="simclr")
            request.inputs.add(name="images", datatype="BYTES", shape=[len(images)])
            request.outputs.add(name="features")
            request.raw_input_contents.append(
                b"".join(struct.pack("<I", len(j)) + j for j in images)
            )
            reply = await infer(request)
            return np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(len(images), -1)

        return v2g
    url = f"http://127.0.0.1:{port}"
    if server == "simclr-v2-http":

        async def v2h(images: list[bytes]) -> np.ndarray:
            blob = b"".join(struct.pack("<I", len(j)) + j for j in images)
            header = json.dumps(
                {
                    "inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)],
                                "parameters": {"binary_data_size": len(blob)}}],
                    "outputs": [{"name": "features", "parameters": {"binary_data": True}}],
                }
            ).encode()  # fmt: skip
            headers = {"Inference-Header-Content-Length": str(len(header))}
            async with http.post(
                url + "/v2/models/simclr/infer", data=header + blob, headers=headers
            ) as r:
                body = await r.read()
                split = int(r.headers["Inference-Header-Content-Length"])
            return np.frombuffer(body[split:], "<f4").reshape(len(images), -1)

        return v2h
    if server == "simclr-openai":

        async def openai(images: list[bytes]) -> np.ndarray:
            body = {"model": "simclr", "input": [b64(j) for j in images],
                    "encoding_format": "base64"}  # fmt: skip
            async with http.post(url + "/v1/embeddings", json=body) as r:
                data = (await r.json())["data"]
            return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data])

        return openai

    async def peer(images: list[bytes]) -> np.ndarray:
        async with http.post(url + "/predict", json={"images": [b64(j) for j in images]}) as r:
            answer = await r.json()
        return np.frombuffer(base64.b64decode(answer["embeddings"]), "<f4").reshape(len(images), -1)

    return peer


async def load(call: Call, photos: list[bytes], per: int, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    phase = {"measure": False}
    errors: list[str] = []

    async def client(i: int) -> None:
        k = i
        while time.perf_counter() < end:
            images = [photos[(k + j) % len(photos)] for j in range(per)]
            k += per
            t0 = time.perf_counter()
            try:
                await call(images)
            except Exception as exc:  # a failed call is counted, not retried
                errors.append(type(exc).__name__)
                await asyncio.sleep(0.05)
                continue
            if phase["measure"]:
                latencies.append(time.perf_counter() - t0)

    end = time.perf_counter() + 0.5 + seconds
    tasks = [asyncio.ensure_future(client(i * 7)) for i in range(clients)]
    await asyncio.sleep(0.5)  # warm-up, not counted
    phase["measure"], started = True, time.perf_counter()
    await asyncio.gather(*tasks)
    took = time.perf_counter() - started
    latencies.sort()
    if not latencies:
        return {"img_s": 0.0, "p50": float("nan"), "p99": float("nan"), "errors": len(errors)}
    q = lambda f: 1e3 * latencies[min(len(latencies) - 1, int(f * len(latencies)))]  # noqa: E731
    rate = per * len(latencies) / took
    return {"img_s": rate, "p50": q(0.5), "p99": q(0.99), "errors": len(errors)}


async def measure(
    servers: list[str], ports: dict[str, int], photos: list[bytes], reference: np.ndarray | None,
    args: argparse.Namespace,
) -> tuple[list[dict], np.ndarray]:  # fmt: skip
    rows = []
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports.get('grpc', 0)}")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:
        for server in servers:
            call = make_call(server, ports["http"], channel, http)
            first = await call(photos[:1])  # [1, D]
            if reference is None:
                reference = first
            gap = float(np.abs(first - reference).max())
            assert gap < 1e-3, f"{server} answers differently from simclr-v1 ({gap})"
            for per in args.images:
                for clients in args.clients:
                    row = await load(call, photos, per, clients, args.seconds)
                    rows.append({"server": server, "per": per, "clients": clients, **row})
                    print(f"| {args.model_name} | {server} | {per} | {clients} | "
                          f"{row['img_s']:.0f} | {row['p50']:.1f} | {row['p99']:.1f} | "
                          f"{row['errors']} |", flush=True)  # fmt: skip
    await channel.close()
    assert reference is not None
    return rows, reference


def start_ours(model: Path, extra: list[str]) -> tuple[subprocess.Popen[str], dict[str, int]]:
    proc, m, lines = start_process(
        [sys.executable, "-m", "simclr_embed.server", "--model", str(model), "--port", "0",
         "--http-port", "0", "--device", "cpu", "--max-queue", "8192", "--drain-delay-s", "0",
         *extra],
        r"SERVING on 127\.0\.0\.1:(\d+)",
    )  # fmt: skip
    http = int(next(ln for ln in lines if "HTTP on" in ln).split("127.0.0.1:")[1].split()[0])
    return proc, {"grpc": int(m.group(1)), "http": http}


def start_peer(name: str, model: Path) -> tuple[subprocess.Popen[str], dict[str, int]] | None:
    port = free_port()
    try:
        proc, _, _ = start_process(
            [sys.executable, str(REPO / "bench" / "peer_servers.py"), name, "--model", str(model),
             "--port", str(port)],
            r"READY (\d+)",
        )  # fmt: skip
    except Exception as exc:  # not installed, or failed to start: reported, not fatal
        print(f"<!-- {name} did not start: {str(exc).splitlines()[-1][:300]} -->", flush=True)
        return None
    return proc, {"http": port}


def summary(rows: list[dict], model: str) -> list[str]:
    def best(
        names: tuple[str, ...], per: int, clients: int, key: str = "img_s"
    ) -> tuple[str, float]:
        cells = [
            r for r in rows if r["server"] in names and r["per"] == per and r["clients"] == clients
        ]
        if not cells:
            return "-", float("nan")
        pick = (max if key == "img_s" else min)(cells, key=lambda r: r[key])
        return pick["server"], pick[key]

    out = []
    for per, clients, key in ((1, 64, "img_s"), (16, 64, "img_s"), (1, 1, "p50")):
        ours, peer = best(OURS, per, clients, key), best(PEERS, per, clients, key)
        ratio = ours[1] / peer[1] if key == "img_s" else peer[1] / ours[1]
        out.append(f"- {model}, {clients} client(s) × {per} JPEG: {key} ours {ours[1]:.1f} "
                   f"({ours[0]}) vs best peer {peer[1]:.1f} ({peer[0]}): {ratio:.2f}×")  # fmt: skip
    v1 = {(r["per"], r["clients"]): r["img_s"] for r in rows if r["server"] == "simclr-v1"}
    for server in OURS[1:]:
        for (per, clients), rate in sorted(v1.items()):
            mine = next((r["img_s"] for r in rows if r["server"] == server and r["per"] == per
                         and r["clients"] == clients), None)  # fmt: skip
            if mine and per == 16 and clients == max(c for _, c in v1):
                out.append(f"- {model}, {server} / simclr-v1 img/s at {clients} × {per}: "
                           f"{mine / rate:.2f}×")  # fmt: skip
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16, 64])
    p.add_argument("--images", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16])
    p.add_argument("--models", default="resnet18,noop", help="resnet18 (@ 64 px) and/or noop")
    p.add_argument("--servers", default=",".join(OURS + PEERS))
    p.add_argument("--photo", default="640x480", help="JPEG size WxH [640x480]")
    p.add_argument("--serve-args", default="", help="more simclr serve flags (exploration)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-peers")
    args = p.parse_args()
    width, height = (int(v) for v in args.photo.split("x"))
    photos, origin = load_photos(32, width, height)
    wanted = args.servers.split(",")
    print(f"JPEGs: {len(photos)} × {args.photo} ({origin}); {args.seconds:g} s per cell\n")
    print("| model | server | images/request | clients | img/s | p50 ms | p99 ms | failed calls |")
    print("|---|---|---|---|---|---|---|---|")
    notes = []
    for name in args.models.split(","):
        model = (
            build_model("resnet18", 64, "auto", args.work)
            if name == "resnet18"
            else noop_model(args.work / "noop.onnx")
        )
        args.model_name = name
        rows: list[dict] = []
        reference = None
        proc, ports = start_ours(model, args.serve_args.split())
        try:
            ours = [s for s in OURS if s in wanted]
            got, reference = asyncio.run(measure(ours, ports, photos, reference, args))
            rows += got
        finally:
            stop_process(proc)
        for peer in (s for s in PEERS if s in wanted):
            started = start_peer(peer, model)
            if started is None:
                continue
            proc, ports = started
            try:
                got, _ = asyncio.run(measure([peer], ports, photos, reference, args))
                rows += got
            finally:
                stop_process(proc)
        notes += summary(rows, name)
    print("\n" + "\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
