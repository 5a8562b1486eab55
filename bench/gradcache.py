"""Gradient caching (``--chunk-size``): peak memory and time of one SimCLR training step, chunked
vs the whole batch at once, each in a fresh process (peak RSS is per process). Results:
docs/benchmarks.md "Gradient caching".

    .venv/bin/python bench/gradcache.py [--batch-size 1024 --chunk-size 128 --image-size 64]

The step is the trainer's own (``simclr_embed.training.gradcache.cached_backward`` or the plain
forward/backward the trainer runs without it), LARS, fp32, synthetic views already in memory.
Goals (issue 26): chunked peak ≤ 0.4× and step time ≤ 1.35× the unchunked step's.

On a GPU (bench/gpu_check.sh) peak memory is ``torch.cuda.max_memory_allocated``, and
``--largest`` first finds the largest unchunked batch that fits (doubling from 64 until out of
memory), then runs ``--batch-size`` (4096) chunked, in images/s::

    python bench/gradcache.py --device cuda --precision bf16 --arch resnet50 --image-size 224 \
        --batch-size 4096 --chunk-size 256 --largest
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args: argparse.Namespace) -> dict[str, float]:
    import torch

    device = torch.device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]

    from simclr_embed.training.gradcache import cached_backward
    from simclr_embed.training.loss import nt_xent_loss_and_accuracy
    from simclr_embed.training.model import SimCLRModel
    from simclr_embed.training.optim import build_optimizer

    torch.manual_seed(0)
    model = SimCLRModel(args.arch, args.stem, proj_dim=128).train().to(device)
    opt = build_optimizer("lars", model, lr=0.1, weight_decay=1e-6)
    x = torch.randn(2 * args.batch_size, 3, args.image_size, args.image_size, device=device)
    before = _rss_mb()

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def loss_of(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = z.float().chunk(2)
        return nt_xent_loss_and_accuracy(z1, z2, 0.2)

    def step() -> None:
        if args.chunk_size:
            cached_backward(model, x, args.chunk_size, loss_of, autocast=autocast)
        else:
            with autocast():
                _, z = model(x)
            loss, _ = loss_of(z)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb()
    return {"step_s": statistics.median(times), "peak_mb": peak, "before_mb": before}


def largest(base: list[str]) -> tuple[int, dict[str, float]] | None:
    """The largest unchunked batch (64, 128, ...) whose step runs, and its numbers."""
    best, batch = None, 64
    while batch <= 65536:
        run = subprocess.run([*base, "--batch-size", str(batch), "--chunk-size", "0"],
                             capture_output=True, text=True)  # fmt: skip
        if run.returncode != 0:  # out of memory (or another failure: its last line says)
            break
        best, batch = (batch, json.loads(run.stdout.strip().splitlines()[-1])), batch * 2
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--stem", default="standard")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1024, help="per step (2× views)")
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument(
        "--largest",
        action="store_true",
        help="GPU: the largest unchunked batch vs --batch-size chunked",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    common = [sys.executable, __file__, "--worker", "--arch", args.arch, "--stem", args.stem,
              "--image-size", str(args.image_size), "--steps", str(args.steps),
              "--device", args.device, "--precision", args.precision]  # fmt: skip
    if args.largest:
        found = largest(common)
        out = subprocess.run([*common, "--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        chunked = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {args.arch} @ {args.image_size} {args.precision} {args.device} | batch | img/s | peak MB |\n|---|---|---|---|"
        )
        if found:
            b, r = found
            print(f"| largest unchunked | {b} | {b / r['step_s']:.0f} | {r['peak_mb']:.0f} |")
        print(
            f"| chunk {args.chunk_size} | {args.batch_size} | {args.batch_size / chunked['step_s']:.0f} | {chunked['peak_mb']:.0f} |"
        )
        return 0
    base = [*common, "--batch-size", str(args.batch_size)]
    runs = {}
    for name, chunk in (("whole batch", 0), (f"chunk {args.chunk_size}", args.chunk_size)):
        out = subprocess.run([*base, "--chunk-size", str(chunk)], capture_output=True, text=True, check=True)  # fmt: skip
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    whole, chunked = runs.values()
    print(f"{platform.processor() or platform.machine()}; {args.arch} {args.stem} stem @ "
          f"{args.image_size} px, batch {args.batch_size} ({2 * args.batch_size} views), fp32, LARS, "
          f"median of {args.steps} steps")  # fmt: skip
    print("| step | time per step | peak RSS | RSS before the first step |\n|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['step_s']:.2f} s | {r['peak_mb']:.0f} MB | {r['before_mb']:.0f} MB |")
    grown = (chunked["peak_mb"] - chunked["before_mb"]) / (whole["peak_mb"] - whole["before_mb"])
    print(
        f"chunked / whole: time {chunked['step_s'] / whole['step_s']:.2f}×, peak RSS "
        f"{chunked['peak_mb'] / whole['peak_mb']:.2f}× (the step's own growth {grown:.2f}×)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
