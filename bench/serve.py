"""Serving benchmark: closed-loop load on `simclr serve` beside two references, in one run.

    .venv/bin/python bench/serve.py                                   # resnet18 @ 64 px, CPU
    .venv/bin/python bench/serve.py --arch resnet50 --image-size 224
    .venv/bin/python bench/serve.py --device cuda --clients 1 32 128  # on a GPU host
    .venv/bin/python bench/serve.py --device cuda --runtime torch     # the .pt2 torch runtime

What runs (all on 127.0.0.1, every loop bounded by --seconds):
  server  `python -m simclr_embed.server` in its own process; C closed-loop clients (grpc.aio, one coroutine
          each, one 640×480 JPEG per request) for each C in --clients: img/s, p50/p95/p99 latency,
          mean model batch size (from the server's own /metrics).
  P1      a tight in-process loop: decode + preprocess (the server's own Preprocessor) +
          session.run at the server's mean batch size. Goal: server >= 0.90 × P1.
  P2      a naive gRPC server (same proto, same decode, same session options) that calls
          session.run once per RPC with no batching, under the largest C. Goal: server >= 1.5 × P2
          (resnet18 @ 64 px, CPU), >= 1.0 × (resnet50 @ 224), >= 5 × on a GPU.
  P3      p50 latency with 1 client <= model time at batch 1 + max delay + 2 ms.

The model is a freshly initialized SimCLR checkpoint exported by the real exporter (cached in
runs/bench-serve/). This script imports torch to build it; the server processes never do.
Photos: scikit-image's bundled sample photos (`pip install -e '.[bench]'`), else synthesized.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib.util
import io
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simclr_embed.inference.images import Preprocessor  # noqa: E402
from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb  # noqa: E402
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc  # noqa: E402

SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "grass.png",
    "brick.png",
)


# -- inputs -----------------------------------------------------------------------------------


def build_model(arch: str, size: int, stem: str, out_dir: Path, runtime: str = "onnx") -> Path:
    """A freshly initialized SimCLR model at ``size`` px, exported to ONNX (cached); with
    ``runtime="torch"`` its ``--torch-program`` twin (``.pt2``) is returned instead."""
    import torch

    from simclr_embed.export.onnx_export import export_checkpoint
    from simclr_embed.training.checkpoint import FORMAT
    from simclr_embed.training.model import SimCLRModel, default_stem

    stem = default_stem(size) if stem == "auto" else stem
    out = out_dir / f"{arch}-{size}-{stem}.onnx"
    program = out.with_suffix(".pt2")
    if out.exists() and (runtime == "onnx" or program.exists()):
        return program if runtime == "torch" else out
    torch.manual_seed(0)
    cfg = {
        "arch": arch,
        "stem": stem,
        "image_size": size,
        "proj_dim": 128,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    model = SimCLRModel(arch, cfg["stem"], 128)
    ckpt = out_dir / f"{arch}-{size}-{stem}.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"format": FORMAT, "model": model.state_dict(), "config": cfg, "step": 0, "epoch": 0}, ckpt
    )
    report = export_checkpoint(ckpt, out, verify=False)
    if runtime == "torch":
        from simclr_embed.export.torch_program import export_torch_program

        export_torch_program(ckpt, program, report["metadata"], verify=False)
        return program
    return out


def load_photos(n: int, width: int = 640, height: int = 480) -> tuple[list[bytes], str]:
    """``n`` distinct JPEGs (quality 90) of ``width``×``height``: crops of real sample photos."""
    spec = importlib.util.find_spec("skimage")
    sources: list[Image.Image] = []
    if spec and spec.submodule_search_locations:
        data = Path(next(iter(spec.submodule_search_locations))) / "data"
        sources = [
            Image.open(data / name).convert("RGB")
            for name in SKIMAGE_PHOTOS
            if (data / name).exists()
        ]
    origin = f"scikit-image sample photos ({len(sources)})" if sources else "synthesized"
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if sources:
            src = sources[i % len(sources)]
            scale = max(width / src.width, height / src.height) * rng.uniform(1.0, 1.5)
            big = src.resize(
                (round(src.width * scale) + 1, round(src.height * scale) + 1),
                Image.Resampling.BICUBIC,
            )
            x, y = rng.integers(0, big.width - width + 1), rng.integers(0, big.height - height + 1)
            img = big.crop((x, y, x + width, y + height))
        else:  # smooth fields plus noise: compresses like a photo, unlike pure noise
            yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
            chans = [
                np.sin(2 * np.pi * (rng.uniform(1, 5) * xx + rng.uniform(1, 5) * yy))
                for _ in range(3)
            ]
            arr = 128 + 100 * np.stack(chans, 2) + rng.normal(0, 12, (height, width, 3))
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out, origin


# -- servers ----------------------------------------------------------------------------------


def start_process(
    cmd: list[str], ready: str
) -> tuple[subprocess.Popen[str], re.Match[str], list[str]]:
    """Start ``cmd``; wait for a stderr line matching ``ready``; keep reading stderr in a thread."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    threading.Thread(
        target=lambda: lines.extend(iter(proc.stderr.readline, "")),  # type: ignore[union-attr]
        daemon=True,
    ).start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        match = re.search(ready, "".join(lines))
        if match:
            return proc, match, lines
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start:\n{''.join(lines)[-3000:]}")


def stop_process(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def naive_server(model: str, device: str, port: int, workers: int) -> int:
    """P2: one session.run per RPC, no batching; a thread per concurrent RPC."""
    import grpc

    from simclr_embed.inference.runtime import open_runtime

    runtime = open_runtime(model, device=device, max_batch_size=1)
    runtime.warm_up()
    pre = Preprocessor(runtime.info.image_size, runtime.info.resize)

    class Naive(pb_grpc.EmbeddingServiceServicer):
        def Embed(
            self, request: pb.EmbedRequest, context: grpc.ServicerContext
        ) -> pb.EmbedResponse:
            batch = np.stack([pre.from_encoded(im.encoded) for im in request.images])
            vectors = runtime.encode(batch)["features"]
            return pb.EmbedResponse(
                embeddings=[pb.Embedding(values=v) for v in vectors.tolist()],
                kind=pb.EMBEDDING_KIND_FEATURES,
                dimension=vectors.shape[1],
            )

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(workers))
    pb_grpc.add_EmbeddingServiceServicer_to_server(Naive(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"NAIVE SERVING on 127.0.0.1:{bound}", file=sys.stderr, flush=True)
    server.wait_for_termination()
    return 0


# -- load -------------------------------------------------------------------------------------


async def closed_loop(
    target: str, photos: list[bytes], clients: int, seconds: float, warmup_s: float = 1.0
) -> dict[str, float]:
    """``clients`` coroutines, each sending one image per request back to back.

    Throughput counts answers that arrive inside the measured window (after ``warmup_s``, for
    ``seconds``); latency is taken over requests sent inside it. Clients send nothing after the
    window, so the run ends within one request's latency of it.
    """
    import grpc

    requests = [pb.EmbedRequest(images=[pb.Image(encoded=p)]) for p in photos]
    latencies: list[float] = []
    answered = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + seconds

        async def client(k: int) -> None:
            nonlocal answered
            i = k
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                await stub.Embed(requests[i % len(requests)], timeout=60)
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    latencies.append(t1 - t0)
                if measure_from <= t1 < stop_at:
                    answered += 1
                i += clients

        await asyncio.gather(*(client(k) for k in range(clients)))
    return {"seconds": seconds, "latencies": latencies, "answered": answered}


def summarize(runs: list[dict]) -> dict[str, float]:
    """Pool several closed-loop runs: img/s = median over runs, latency percentiles over all."""
    lat = np.concatenate([np.asarray(r["latencies"]) for r in runs]) * 1e3  # ms
    rates = [r["answered"] / r["seconds"] for r in runs]
    return {
        "img_s": float(np.median(rates)),
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p99": float(np.percentile(lat, 99)),
        "n": len(lat),
    }


def scrape_batches(metrics_port: int) -> tuple[float, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()

    def value(name: str) -> float:
        m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    return value("simclr_batch_size_sum"), value("simclr_batch_size_count")


class InProcess:
    """P1: decode + preprocess (a thread per core, like the server) + session.run, ``batch``
    images per run, no server, no gRPC."""

    def __init__(self, model: Path, device: str, batch: int) -> None:
        from simclr_embed.inference.runtime import open_runtime, usable_cores

        # One batch at a time, so the model gets every core (ONNX Runtime's own best setting).
        self.runtime = open_runtime(model, device=device, max_batch_size=max(batch, 1))
        self.pool = concurrent.futures.ThreadPoolExecutor(usable_cores())
        self.runtime.warm_up()
        self.pre = Preprocessor(self.runtime.info.image_size, self.runtime.info.resize)
        self.batch = batch

    def model_ms(self, photo: bytes, repeats: int = 50) -> float:
        """Median time of one session.run at batch 1."""
        one = np.stack([self.pre.from_encoded(photo)])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.runtime.encode(one)
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    def run(self, photos: list[bytes], seconds: float) -> float:
        done, i = 0, 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            batch = [photos[(i + k) % len(photos)] for k in range(self.batch)]
            self.runtime.encode(np.stack(list(self.pool.map(self.pre.from_encoded, batch))))
            done, i = done + self.batch, i + self.batch
        return done / (time.perf_counter() - t0)


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--stem",
        choices=("auto", "small", "medium", "standard"),
        default="auto",
        help="auto: what `simclr train` picks (small at <= 64 px)",
    )
    p.add_argument(
        "--model", type=Path, default=None, help="use this .onnx/.pt2 instead of building one"
    )
    p.add_argument(
        "--runtime",
        choices=("onnx", "torch"),
        default="onnx",
        help="build the .onnx (ONNX Runtime) or the .pt2 (torch runtime) model",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per load phase")
    p.add_argument("--rounds", type=int, default=2, help="phases take turns this many times")
    p.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured seconds per phase")
    p.add_argument(
        "--cache", type=Path, default=REPO / "runs" / "bench-serve", help="built models go here"
    )
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--photos", type=int, default=64, help="distinct JPEGs cycled through")
    p.add_argument(
        "--server-args", default="", help="extra flags for `python -m simclr_embed.server`"
    )
    p.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.naive_server:
        return naive_server(str(args.model), args.device, args.port, args.workers)
    if not 0 < args.seconds <= 120 or not 1 <= args.rounds <= 10 or max(args.clients) > 512:
        p.error("--seconds in (0, 120], --rounds in 1..10, --clients at most 512 (bounded load)")

    model = args.model or build_model(
        args.arch, args.image_size, args.stem, args.cache, args.runtime
    )
    photos, origin = load_photos(args.photos)
    print(
        f"model {model.name}, device {args.device}, {len(photos)} JPEGs 640x480 "
        f"(~{np.mean([len(x) for x in photos]) / 1e3:.0f} kB, {origin}), {os.cpu_count()} CPUs, "
        f"{args.rounds} rounds of {args.seconds:.0f} s per phase",
        flush=True,
    )

    c_max = max(args.clients)
    server_cmd = [
        sys.executable,
        "-m",
        "simclr_embed.server",
        "--model",
        str(model),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--device",
        args.device,
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-delay-ms",
        str(args.max_delay_ms),
        "--drain-delay-s",  # nothing balances load here: stop at once when done
        "0",
        *args.server_args.split(),
    ]
    naive_cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--naive-server",
        "--model",
        str(model),
        "--device",
        args.device,
        "--workers",
        str(c_max),
    ]
    # Both servers stay up for the whole run (an idle one costs nothing) and the phases take
    # turns, round after round, so that load from elsewhere on a shared machine hits all alike.
    server, m, _ = start_process(
        server_cmd, r"metrics on http://127\.0\.0\.1:(\d+)(?s:.*)SERVING on 127\.0\.0\.1:(\d+)"
    )
    metrics_port, target = int(m.group(1)), f"127.0.0.1:{m.group(2)}"
    procs = [server]
    try:
        naive, m, _ = start_process(naive_cmd, r"NAIVE SERVING on 127\.0\.0\.1:(\d+)")
        procs.append(naive)
        naive_target = f"127.0.0.1:{m.group(1)}"
        runs: dict[int, list[dict]] = {c: [] for c in args.clients}
        batches = {c: [0.0, 0.0] for c in args.clients}  # images, model calls
        naive_runs: list[dict] = []
        p1_rates: list[float] = []
        model_ms: list[float] = []
        p1: InProcess | None = None
        for r in range(args.rounds):
            for c in args.clients:
                before = scrape_batches(metrics_port)
                runs[c].append(
                    asyncio.run(closed_loop(target, photos, c, args.seconds, args.warmup_s))
                )
                after = scrape_batches(metrics_port)
                batches[c][0] += after[0] - before[0]
                batches[c][1] += after[1] - before[1]
            naive_runs.append(
                asyncio.run(closed_loop(naive_target, photos, c_max, args.seconds, args.warmup_s))
            )
            if p1 is None:  # P1 runs at the batch size the server reached under the most load
                p1 = InProcess(
                    model,
                    args.device,
                    max(1, round(batches[c_max][0] / max(batches[c_max][1], 1))),
                )
            p1_rates.append(p1.run(photos, args.seconds))
            model_ms.append(p1.model_ms(photos[0]))
            last = summarize(runs[c_max][-1:])["img_s"]
            print(
                f"  round {r + 1}: server C={c_max} {last:.1f} img/s, naive "
                f"{summarize(naive_runs[-1:])['img_s']:.1f}, P1 {p1_rates[-1]:.1f}",
                flush=True,
            )
    finally:
        for proc in procs:
            stop_process(proc)
    assert p1 is not None

    print("\n| setup | clients | img/s | p50 ms | p95 ms | p99 ms | mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    served = {c: summarize(runs[c]) for c in args.clients}
    for c in args.clients:
        st, mean_batch = served[c], batches[c][0] / max(batches[c][1], 1)
        print(
            f"| simclr serve | {c} | {st['img_s']:.1f} | {st['p50']:.1f} | {st['p95']:.1f} | "
            f"{st['p99']:.1f} | {mean_batch:.1f} |"
        )
    nv = summarize(naive_runs)
    print(
        f"| naive server (P2) | {c_max} | {nv['img_s']:.1f} | {nv['p50']:.1f} | {nv['p95']:.1f} | "
        f"{nv['p99']:.1f} | 1 |"
    )
    p1_rate, m_ms = float(np.median(p1_rates)), float(np.median(model_ms))
    print(f"| in-process loop (P1) | – | {p1_rate:.1f} | | | | {p1.batch} |")
    print()
    print(f"P1: server / in-process = {served[c_max]['img_s'] / p1_rate:.2f} (goal >= 0.90)")
    print(f"P2: server / naive at {c_max} clients = {served[c_max]['img_s'] / nv['img_s']:.2f}")
    if 1 in served:
        bound = m_ms + args.max_delay_ms + 2.0
        p50 = served[1]["p50"]
        print(
            f"P3: p50 with 1 client = {p50:.2f} ms; model at batch 1 ({m_ms:.2f} ms) + delay "
            f"+ 2 ms = {bound:.2f} ms ({'met' if p50 <= bound else 'NOT met'})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
