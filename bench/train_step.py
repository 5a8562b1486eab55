"""Training-step throughput: SimCLR step vs a plain supervised step, plus the data pipeline.

In one run, on the same backbone, batch and precision:

- supervised: B images → backbone → Linear(F, 1000) → cross-entropy → SGD step (and the same
  at 2B images, to separate "two views" from "head + loss + optimizer");
- SimCLR: B images → 2B views → backbone → projection head → NT-Xent → optimizer step
  (LARS by default). The all-gather of the loss is an identity in one process; at W processes
  it moves 2·B·P floats per rank, which is small next to the backbone;
- the data pipeline: decode + two augmented views per image, with W DataLoader workers.

Steps run on synthetic tensors already on the device, interleaved in rounds (sup, sup 2B, SimCLR,
...) so that a noisy shared machine slows both alike; the median round is reported. The goal is
SimCLR ≥ 0.45 × supervised images/s (two views cost 2×; head, loss and gather ≤ ~10%).

CPU (defaults)::  python bench/train_step.py
GPU::             python bench/train_step.py --device cuda --arch resnet50 --image-size 224 \\
                      --precision bf16 --batch-size 128 --workers 14
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_embed.training.augment import SimCLRAugment
from simclr_embed.training.data import build_train_loader
from simclr_embed.training.loss import nt_xent_loss
from simclr_embed.training.model import SimCLRModel
from simclr_embed.training.optim import build_optimizer


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--stem", default="standard", choices=("small", "medium", "standard"))
    p.add_argument("--batch-size", type=int, default=64, help="images per step (SimCLR: 2× views)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--optimizer", default="lars", help="SimCLR step optimizer (supervised: sgd)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=4, help="steps per round and kind")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the data part")
    p.add_argument("--data", help="image folder for the data part (default: generated photos)")
    p.add_argument("--data-images", type=int, default=512, help="generated images")
    p.add_argument(
        "--data-source-size",
        type=int,
        default=None,
        help="side of generated images (default: image size × 1.6, at least 48)",
    )
    p.add_argument("--data-batches", type=int, default=20, help="timed batches of the data part")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--stop-check-processes",
        type=int,
        default=2,
        help="gloo processes timing the per-step stop agreement (0: skip)",
    )
    return p.parse_args()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], None]]:
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    cl = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    B, S = args.batch_size, args.image_size

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)

    # Supervised reference: same trunk, linear classifier, SGD (the torchvision reference recipe).
    sup = SimCLRModel(args.arch, args.stem, 128).backbone.to(device, memory_format=cl)
    sup.fc = nn.Linear(SimCLRModel(args.arch, args.stem, 8).feature_dim, 1000).to(device)
    sup_opt = torch.optim.SGD(sup.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    sim = SimCLRModel(args.arch, args.stem, 128).to(device, memory_format=cl)
    sim_opt = build_optimizer(args.optimizer, sim, lr=0.01, weight_decay=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    if args.compile:
        sup, sim = torch.compile(sup), torch.compile(sim)

    x = torch.randn(B, 3, S, S, device=device).contiguous(memory_format=cl)  # [B, 3, S, S]
    y = torch.randint(0, 1000, (B,), device=device)
    y2 = torch.randint(0, 1000, (2 * B,), device=device)
    v = torch.randn(2 * B, 3, S, S, device=device).contiguous(memory_format=cl)  # [2B, 3, S, S]

    def step(
        model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]
    ) -> None:
        loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def sup_loss() -> torch.Tensor:
        with autocast():
            logits = sup(x)  # [B, 1000]
        return F.cross_entropy(logits.float(), y)

    def sup2_loss() -> torch.Tensor:  # as many images as SimCLR has views
        with autocast():
            logits = sup(v)  # [2B, 1000]
        return F.cross_entropy(logits.float(), y2)

    def sim_loss() -> torch.Tensor:
        with autocast():
            _, z = sim(v)  # [2B, P]
        z1, z2 = z.float().chunk(2)
        return nt_xent_loss(z1, z2, 0.1)

    sup.train()
    sim.train()
    return {
        "supervised": lambda: step(sup, sup_opt, sup_loss),
        "supervised_2b": lambda: step(sup, sup_opt, sup2_loss),
        "simclr": lambda: step(sim, sim_opt, sim_loss),
    }


def bench_steps(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    steps = make_steps(args, device)
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    rates: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            _sync(device)
            images = args.steps * args.batch_size * (2 if name == "supervised_2b" else 1)
            rates[name].append(images / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def make_photos(root: Path, n: int, side: int) -> list[Path]:
    """Smooth, JPEG-friendly synthetic photos (shapes on gradients, blurred, mild noise)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h = int(side * rng.uniform(1.0, 1.5)), side
        grad = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 255, 3) + rng.uniform(0, 128, 3)
        arr = np.broadcast_to(grad, (h, w, 3)) + rng.normal(0, 8, (h, w, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.uniform(0, w * 0.7)), int(rng.uniform(0, h * 0.7))
            d.ellipse(
                (x0, y0, x0 + w // 4, y0 + h // 4),
                fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
            )
        path = root / f"{i:05d}.jpg"
        img.filter(ImageFilter.GaussianBlur(1)).save(path, quality=90)
        paths.append(path)
    return paths


def bench_data(args: argparse.Namespace, paths: list[Path], cuda: bool) -> float:
    """Two-view images/s of decode + augmentation + collate with ``args.workers`` workers."""
    aug = SimCLRAugment(args.image_size, strength=0.5 if args.image_size <= 64 else 1.0)
    batch = min(args.batch_size, len(paths))
    sampler, loader = build_train_loader(
        paths,
        aug,
        batch_size=batch,
        workers=args.workers,
        seed=0,
        world_size=1,
        rank=0,
        pin_memory=cuda,
    )
    done, epoch, t0 = -1, 0, 0.0
    while done < args.data_batches:
        sampler.set_epoch(epoch)
        for _ in loader:
            done += 1
            if done == 0:  # the first batch pays for worker start-up: not timed
                t0 = time.perf_counter()
            if done == args.data_batches:
                break
        epoch += 1
    return args.data_batches * batch / (time.perf_counter() - t0)


def _stop_check_worker(rank: int, world: int, port: int, calls: int, out: object) -> None:
    import torch.distributed as tdist

    from simclr_embed.training import distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    for _ in range(50):
        dist.any_rank(False)
    t0 = time.perf_counter()
    for _ in range(calls):
        dist.any_rank(False)
    if rank == 0:
        out.value = (time.perf_counter() - t0) / calls  # type: ignore[attr-defined]
    tdist.destroy_process_group()


def bench_stop_check(processes: int, calls: int = 2000) -> float:
    """Seconds per ``simclr_embed.training.distributed.any_rank`` call (the stop agreement every step makes)
    among ``processes`` gloo processes on this machine."""
    import multiprocessing
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = multiprocessing.get_context("spawn").Value("d", 0.0)
    tmp.spawn(_stop_check_worker, args=(processes, port, calls, out), nprocs=processes)
    return out.value


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        desc = f"{torch.cuda.get_device_name(device)} + " + desc
    return desc


def main() -> int:
    args = get_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    rates = bench_steps(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            from simclr_embed.training.data import find_images

            paths = find_images(args.data)
        else:
            paths = make_photos(
                Path(tmp),
                args.data_images,
                args.data_source_size or max(48, int(args.image_size * 1.6)),
            )
        data_rate = bench_data(args, paths, device.type == "cuda")
    sup, sup2, sim = rates["supervised"], rates["supervised_2b"], rates["simclr"]
    ratio = sim / sup
    # SimCLR pushes 2B views through the same trunk as the 2B-image supervised step; what it
    # loses beyond that is the projection head, the NT-Xent loss (and gather) and the optimizer.
    overhead = sup2 / (2 * sim) - 1
    print(f"machine: {machine(device)}")
    print(f"command: python bench/train_step.py {' '.join(sys.argv[1:])}")
    print(
        f"setup: {args.arch} ({args.stem} stem), {args.image_size} px, batch {args.batch_size}, "
        f"{args.precision}, SimCLR optimizer {args.optimizer}, compile={args.compile}"
    )
    print()
    print("| step | images/s | vs supervised |")
    print("|---|---:|---:|")
    print(f"| supervised: B images, CE on a linear head, SGD | {sup:.1f} | 1.00× |")
    print(f"| supervised at 2B images (as many as SimCLR views) | {sup2:.1f} | {sup2 / sup:.2f}× |")
    print(
        f"| SimCLR: B images → 2B views, head, NT-Xent, {args.optimizer} | {sim:.1f} | {ratio:.2f}× |"
    )
    print(
        f"| data: decode + 2 views, {args.workers} workers | {data_rate:.1f} | {data_rate / sup:.2f}× |"
    )
    if args.stop_check_processes > 1:
        check_s = bench_stop_check(args.stop_check_processes)
        step_s = args.batch_size / sim  # one SimCLR step
        print(
            f"| stop agreement: any_rank() over gloo, {args.stop_check_processes} processes | "
            f"{check_s * 1e6:.0f} µs/step | {check_s / step_s:.3%} of a SimCLR step |"
        )
    print()
    verdict = "meets" if ratio >= 0.45 else "MISSES"
    print(
        f"SimCLR/supervised = {ratio:.3f} ({verdict} the ≥ 0.45 goal); head + loss + optimizer "
        f"cost {overhead:+.1%} over the same views through a supervised step; the data pipeline "
        f"feeds {data_rate / sim:.2f}× what the SimCLR step consumes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
