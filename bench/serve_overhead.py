"""The server's own ceiling, with the model taken out of the picture — beside the Python gRPC
ceiling measured in the same run.

    .venv/bin/python bench/serve_overhead.py
    .venv/bin/python bench/serve_overhead.py --seconds 3 --clients 1 64 --processes 1 2

What runs (127.0.0.1 only; every phase bounded by --seconds):
  noop model  an ONNX graph with the real model's input and outputs (uint8 [N, 32, 32, 3] →
              features [N, 2048], projection [N, 128]) that does almost nothing (a mean and two
              tiny matmuls), so what is left is decode, batching, proto building and gRPC.
  server      `python -m simclr_embed.server --model noop.onnx` (--processes 1 and, with --processes 1 2, 2).
  echo        a minimal grpc.aio server on the same proto that answers every Embed with a
              precomputed EmbedResponse of the right size: the Python gRPC ceiling here.
  load        grpc.aio closed-loop clients (1 / 16 / 64) in one process, raw 32×32 pixels or a
              small JPEG, 1 or 32 images per request, repeated-float or packed answers.
Reports requests/s, images/s and server CPU-µs per image (from /proc), then three focused
measurements: building + serializing + parsing a 64 × 2048 answer both ways; `simclr embed`
over EmbedStream vs unary calls on the same 4,000 small files; and p50 at 1 client / img/s at 32
clients with --batching continuous vs delay (on the tiny real model).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import grpc  # noqa: E402
from serve import build_model, start_process, stop_process  # noqa: E402

from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb  # noqa: E402
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc  # noqa: E402

S, F, P = 32, 2048, 128


def noop_model(path: Path) -> Path:
    """The do-nothing graph with the real input/outputs and simclr.* metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if path.exists():
        return path
    wf = numpy_helper.from_array(np.linspace(-1, 1, F, dtype=np.float32).reshape(1, F), "wf")
    wp = numpy_helper.from_array(np.linspace(-1, 1, P, dtype=np.float32).reshape(1, P), "wp")
    shape = numpy_helper.from_array(np.array([-1, 1], np.int64), "shape")
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["m", "shape"], ["m2"]),
        helper.make_node("MatMul", ["m2", "wf"], ["features"]),
        helper.make_node("MatMul", ["m2", "wp"], ["projection"]),
    ]
    graph = helper.make_graph(
        nodes,
        "noop",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", S, S, 3])],
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", F]),
            helper.make_tensor_value_info("projection", TensorProto.FLOAT, ["N", P]),
        ],
        initializer=[wf, wp, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime of the last years loads
    meta = {"simclr.arch": "noop", "simclr.image_size": str(S), "simclr.feature_dim": str(F),
            "simclr.projection_dim": str(P), "simclr.resize": "resize",
            "simclr.model_version": "noop"}  # fmt: skip
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def request_images(kind: str, n: int) -> list[pb.Image]:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    if kind == "raw":
        one = pb.Image(raw=pb.RawImage(pixels=arr.tobytes(), height=S, width=S, channels=3))
    else:
        buf = io.BytesIO()
        Image.fromarray(arr).resize((64, 64)).save(buf, "JPEG", quality=85)
        one = pb.Image(encoded=buf.getvalue())
    return [one] * n


class Echo(pb_grpc.EmbeddingServiceServicer):
    """Answers with a precomputed response of the right size (no decode, no model)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.answers: dict[tuple[int, bool], bytes] = {}
        for n in (1, 32):
            v = rng.standard_normal((n, F)).astype(np.float32)
            self.answers[(n, False)] = pb.EmbedResponse(
                embeddings=[pb.Embedding(values=r) for r in v.tolist()], dimension=F,
                kind=pb.EMBEDDING_KIND_FEATURES, model_version="echo",
            ).SerializeToString()  # fmt: skip
            self.answers[(n, True)] = pb.EmbedResponse(
                packed_embeddings=v.tobytes(), dimension=F, kind=pb.EMBEDDING_KIND_FEATURES,
                model_version="echo",
            ).SerializeToString()  # fmt: skip

    async def Embed(self, request: pb.EmbedRequest, context: object) -> pb.EmbedResponse:
        # Parse a prebuilt answer: as costly as building one, without numpy in the way.
        return pb.EmbedResponse.FromString(self.answers[(len(request.images), request.packed)])


def echo_server_main(port_file: Path) -> int:
    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_EmbeddingServiceServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_file.write_text(str(port))
        await server.wait_for_termination()

    asyncio.run(main())
    return 0


async def load(target: str, clients: int, seconds: float, request: pb.EmbedRequest) -> dict:
    """``clients`` closed-loop coroutines on one channel each; counts answers inside the window."""
    done = 0
    latencies: list[float] = []
    channels = [grpc.aio.insecure_channel(target) for _ in range(clients)]
    try:
        stubs = [pb_grpc.EmbeddingServiceStub(c) for c in channels]
        for stub in stubs:  # connect outside the window
            await stub.Embed(request, timeout=30)
        t0 = time.perf_counter()
        end = t0 + seconds

        async def client(stub: pb_grpc.EmbeddingServiceStub) -> None:
            nonlocal done
            while True:
                t = time.perf_counter()
                if t >= end:
                    return
                await stub.Embed(request, timeout=60)
                now = time.perf_counter()
                if now <= end:
                    done += 1
                    latencies.append(now - t)

        await asyncio.gather(*(client(s) for s in stubs))
        return {"rps": done / seconds, "p50_ms": 1e3 * statistics.median(latencies or [0])}
    finally:
        for c in channels:
            await c.close()


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        for child in [pid, *_children(pid)]:
            try:
                fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def start_server(model: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc, m, _ = start_process(
        [sys.executable, "-m", "simclr_embed.server", "--model", str(model), "--port", "0", "--device", "cpu",
         "--max-batch-size", "64", "--max-queue", "8192", "--drain-delay-s", "0", *extra],
        r"SERVING on 127\.0\.0\.1:(\d+)",
    )  # fmt: skip
    return proc, f"127.0.0.1:{m.group(1)}"


def packing_cost(rounds: int = 50) -> str:
    v = np.random.default_rng(0).standard_normal((64, F)).astype(np.float32)
    from simclr_embed.client.codec import to_array

    def repeated() -> None:
        r = pb.EmbedResponse(embeddings=[pb.Embedding(values=x) for x in v.tolist()], dimension=F)
        to_array(pb.EmbedResponse.FromString(r.SerializeToString()))

    def packed() -> None:
        r = pb.EmbedResponse(
            packed_embeddings=np.ascontiguousarray(v, "<f4").tobytes(), dimension=F
        )
        to_array(pb.EmbedResponse.FromString(r.SerializeToString()))

    times = {}
    for name, fn in (("repeated float", repeated), ("packed bytes", packed)):
        fn()
        t0 = time.perf_counter()
        for _ in range(rounds):
            fn()
        times[name] = (time.perf_counter() - t0) / rounds
    ratio = times["repeated float"] / times["packed bytes"]
    return (f"build + serialize + parse a 64 × {F} answer: repeated float "
            f"{1e3 * times['repeated float']:.2f} ms, packed {1e3 * times['packed bytes']:.3f} ms "
            f"= {ratio:.1f}× cheaper (goal ≥ 3×)")  # fmt: skip


def stream_vs_unary(target: str, work: Path, n: int = 4000) -> str:
    from simclr_embed.client import EmbeddingClient
    from simclr_embed.embed.cli import _Remote
    from simclr_embed.embed.job import JobConfig, run_job

    folder = work / "small"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = folder / f"{i:05d}.png"
        if not p.exists():
            Image.fromarray(np.full((S, S, 3), i % 256, np.uint8)).save(p)
    rates: dict[str, list[float]] = {"stream": [], "unary": []}
    for _ in range(2):
        for mode in rates:
            out = work / f"{mode}.npy"
            with EmbeddingClient(target, max_batch=64, timeout=300) as client:
                t0 = time.perf_counter()
                run_job(JobConfig((folder,), out), _Remote(client, 2, stream=mode == "stream"))
                rates[mode].append(n / (time.perf_counter() - t0))
    s, u = (statistics.median(rates[k]) for k in ("stream", "unary"))
    return f"simclr embed, {n} 32×32 PNGs, batch 64: EmbedStream {s:.0f} img/s, unary (2 in flight) {u:.0f} img/s = {s / u:.2f}× (goal ≥ 1.2×)"


def batching_policy(work: Path, seconds: float) -> list[str]:
    model = build_model("resnet18", 32, "standard", work)
    raw = pb.EmbedRequest(images=request_images("raw", 1))
    rows = []
    for policy in ("delay", "continuous"):
        proc, target = start_server(model, "--batching", policy, "--max-delay-ms", "2")
        try:
            one = asyncio.run(load(target, 1, seconds, raw))
            many = asyncio.run(load(target, 32, seconds, raw))
        finally:
            stop_process(proc)
        rows.append(f"| {policy} | {one['p50_ms']:.2f} | {many['rps']:.0f} |")
    return rows


def goal_rounds(
    echo_target: str, servers: dict[str, str], seconds: float, rounds: int
) -> list[str]:
    """The issue's goal row, 64 clients × 1 raw image, echo and each server alternating
    ``rounds`` times (medians; this machine is shared and noisy)."""
    request = pb.EmbedRequest(images=request_images("raw", 1), packed=True)
    rates: dict[str, list[float]] = {"echo": [], **{name: [] for name in servers}}
    for _ in range(rounds):
        rates["echo"].append(asyncio.run(load(echo_target, 64, seconds, request))["rps"])
        for name, target in servers.items():
            rates[name].append(asyncio.run(load(target, 64, seconds, request))["rps"])
    echo = statistics.median(rates["echo"])
    rows = [f"| echo | {echo:.0f} | 1.00 | {min(rates['echo']):.0f}–{max(rates['echo']):.0f} |"]
    for name in servers:
        got = statistics.median(rates[name])
        rows.append(
            f"| {name} | {got:.0f} | {got / echo:.2f} | "
            f"{min(rates[name]):.0f}–{max(rates[name]):.0f} |"
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--processes", type=int, nargs="+", default=[1])
    p.add_argument("--rounds", type=int, default=5, help="alternations for the goal row [5]")
    p.add_argument("--goal-only", action="store_true", help="the goal row only, then stop")
    p.add_argument("--echo-server", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-overhead")
    args = p.parse_args()
    if args.echo_server:
        return echo_server_main(args.echo_server)
    model = noop_model(args.work / "noop.onnx")
    port_file = args.work / "echo.port"
    port_file.unlink(missing_ok=True)
    echo = subprocess.Popen([sys.executable, __file__, "--echo-server", str(port_file)], cwd=REPO)
    while not port_file.exists():
        time.sleep(0.05)
    echo_target = f"127.0.0.1:{port_file.read_text()}"
    servers: dict[str, tuple[subprocess.Popen[str], str]] = {}
    try:
        for n in args.processes:
            name = "simclr serve" + (f" --processes {n}" if n > 1 else "")
            servers[name] = start_server(model, *(("--processes", str(n)) if n > 1 else ()))
        # The path a real model takes (a thread hop per batch), kept beside the default one.
        threads = "simclr serve --model-calls threads"
        servers[threads] = start_server(model, "--model-calls", "threads")
        print(f"{os.cpu_count()} CPUs; noop model; {args.seconds:g} s per phase\n")
        print("goal: 64 clients × 1 raw 32×32 image, packed answers, "
              f"{args.rounds} alternating rounds (median req/s, range)")  # fmt: skip
        print("| server | req/s | vs echo | range |")
        print("|---|---:|---:|---|")
        targets = {name: target for name, (_, target) in servers.items()}
        for row in goal_rounds(echo_target, targets, args.seconds, args.rounds):
            print(row, flush=True)
        if args.goal_only:
            return 0
        print()
        print(
            "| server | request | clients | req/s | img/s | p50 ms | server CPU µs/img | vs echo |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for kind, n, packed in (("raw", 1, False), ("raw", 1, True), ("jpeg", 1, True),
                                ("raw", 32, False), ("raw", 32, True), ("jpeg", 32, True)):  # fmt: skip
            request = pb.EmbedRequest(images=request_images(kind, n), packed=packed)
            label = f"{n}× {kind}{' packed' if packed else ''}"
            for c in args.clients:
                ceiling = asyncio.run(load(echo_target, c, args.seconds, request))
                print(f"| echo | {label} | {c} | {ceiling['rps']:.0f} | {ceiling['rps'] * n:.0f} | {ceiling['p50_ms']:.2f} | | 1.00 |", flush=True)  # fmt: skip
                for name, (proc, target) in servers.items():
                    if name == threads and (kind, n) != ("raw", 1):
                        continue
                    before = cpu_seconds([proc.pid])
                    got = asyncio.run(load(target, c, args.seconds, request))
                    cpu = cpu_seconds([proc.pid]) - before
                    imgs = got["rps"] * n * args.seconds
                    print(f"| {name} | {label} | {c} | {got['rps']:.0f} | {got['rps'] * n:.0f} | "
                          f"{got['p50_ms']:.2f} | {1e6 * cpu / max(imgs, 1):.0f} | {got['rps'] / ceiling['rps']:.2f} |", flush=True)  # fmt: skip
        print()
        print(packing_cost())
        print(stream_vs_unary(targets["simclr serve"], args.work))
    finally:
        for proc, _ in servers.values():
            stop_process(proc)
        echo.terminate()
        echo.wait(30)
    print("\nbatching policy, tiny real model (resnet18 32 px), 1 raw image per request:")
    print("| --batching | p50 ms at 1 client | req/s at 32 clients |")
    print("|---|---:|---:|")
    for row in batching_policy(args.work, args.seconds):
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
