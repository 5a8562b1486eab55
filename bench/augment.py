"""Augmentation cost: where a worker's CPU time goes, the device-side stage vs a per-image loop
and kornia, and training speed with both paths — side by side in one run.

    .venv/bin/python bench/augment.py
    .venv/bin/python bench/augment.py --skip-train     # (a) and (b) only, ~2 minutes

(a) worker CPU-ms per training image at 224 px (decode + two views), from generated photo-like
    JPEGs of 500×375 (ImageNet-like) and 4000×3000 (phone photos): today's path (workers do
    everything) vs --augment-on device (workers decode and crop only); and the split of one
    view: decode (with JPEG draft scaling, and without) / crop+resize / appearance.
(b) the appearance stage on a [256, 3, 224, 224] uint8 CPU batch: simclr_embed.training.device_augment
    (vectorized, per-image parameters) vs simclr_embed.training.augment.apply_per_sample (a Python loop of
    torchvision transforms) vs kornia.augmentation (per-image factors, one op order per batch).
(c) `simclr train` images/s, resnet18 @ 32 px on the CPU, --augment-on workers vs device,
    alternating rounds of --train-steps steps.
Goals (issue 15): (a) device-path workers ≤ 0.4× today's CPU time; (b) ≥ 5× the loop;
(c) the device path on the CPU within 10 % of workers, or auto keeps workers there.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_steps import _write_photo  # noqa: E402

from simclr_embed.imageio import open_image  # noqa: E402
from simclr_embed.training.augment import SimCLRAugment, apply_per_sample  # noqa: E402
from simclr_embed.training.data import UnlabeledImages  # noqa: E402
from simclr_embed.training.device_augment import DeviceAppearance, step_generator  # noqa: E402


def cpu_ms(fn: Callable[[int], object], n: int) -> float:
    """Process CPU milliseconds per call of ``fn(i)`` (what a worker spends)."""
    fn(0)
    t0 = time.process_time()
    for i in range(n):
        fn(i)
    return 1e3 * (time.process_time() - t0) / n


def _one_size(paths: list[Path]) -> dict[str, float]:
    count = len(paths)
    per = {}
    for mode in ("workers", "device"):
        aug = SimCLRAugment(224, 1.0, appearance_on_cpu=mode == "workers")
        ds = UnlabeledImages(paths, aug, seed=0)
        per[mode] = cpu_ms(lambda i: ds[(i % count, 0)], count)  # noqa: B023 (called here)
    aug = SimCLRAugment(224, 1.0)
    per["draft"] = cpu_ms(lambda i: open_image(paths[i % count], draft_size=4 * 224), count)
    per["full"] = cpu_ms(lambda i: open_image(paths[i % count]), count)
    img = open_image(paths[0], draft_size=4 * 224)
    per["geometry"] = cpu_ms(lambda i: aug.geometry(img), 50)
    crop = aug.geometry(img)
    per["appearance"] = cpu_ms(lambda i: aug.appearance(crop), 50)
    return per


def part_a(work: Path, n: int) -> list[str]:
    rows = []
    for w, h, count in ((500, 375, n), (4000, 3000, max(4, n // 8))):
        folder = work / f"jpegs-{w}x{h}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{i:04d}.jpg" for i in range(count)]
        for i, path in enumerate(paths):
            if not path.exists():
                _write_photo((path, i, w, h))
        per = _one_size(paths)
        rows.append(
            f"| {w}×{h} | {per['workers']:.1f} | {per['device']:.1f} | "
            f"{per['device'] / per['workers']:.2f}× | {per['draft']:.1f} ({per['full']:.1f} "
            f"without draft) | {per['geometry']:.1f} | {per['appearance']:.1f} |"
        )
    return rows


def part_b(batch: int, rounds: int) -> list[str]:
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    dev = DeviceAppearance(224, strength=1.0, blur=True)
    cpu = SimCLRAugment(224, 1.0).appearance
    times: dict[str, list[float]] = {"loop": [], "device_augment": [], "kornia": []}
    kornia_aug = None
    try:
        import kornia.augmentation as K

        kornia_aug = K.AugmentationSequential(
            K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur((23, 23), (0.1, 2.0), p=0.5),
            K.Normalize(torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])),
        )
    except ImportError:
        times.pop("kornia")
    for r in range(rounds):
        t0 = time.perf_counter()
        torch.manual_seed(r)
        apply_per_sample(cpu, x)
        times["loop"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dev(x, step_generator(0, r, 0))
        times["device_augment"].append(time.perf_counter() - t0)
        if kornia_aug is not None:
            t0 = time.perf_counter()
            kornia_aug(x.float() / 255)
            times["kornia"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [
        f"| {k} | {1e3 * v:.0f} | {batch / v:.0f} | {med['loop'] / v:.1f}× |"
        for k, v in med.items()
    ]


def part_c(work: Path, steps: int, rounds: int) -> list[str]:
    data = work / "c-data"
    if not data.exists():
        subprocess.run([sys.executable, "-m", "simclr_embed.demo.sample_data", str(data), "--per-class", "64", "--size", "48"], check=True, cwd=REPO, capture_output=True)  # fmt: skip
    rates: dict[str, list[float]] = {"workers": [], "device": []}
    waits: dict[str, list[float]] = {"workers": [], "device": []}
    for r in range(rounds):
        for mode in rates:
            out = work / f"c-{mode}-{r}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            cmd = [sys.executable, "-m", "simclr_embed.training", "--data", str(data), "--out", str(out),
                   "--device", "cpu", "--arch", "resnet18", "--image-size", "32", "--stem",
                   "standard", "--batch-size", "64", "--max-steps", str(steps), "--workers", "1",
                   "--threads", "1", "--log-every", "5", "--no-progress", "--augment-on", mode,
                   "--checkpoint-every", str(steps), "--keep-checkpoints", "0"]  # fmt: skip
            log = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stderr
            found = re.findall(r"([\d.]+) img/s  data wait (\d+)%", log)[1:]  # after start-up
            rates[mode].append(statistics.median(float(a) for a, _ in found))
            waits[mode].append(statistics.median(float(b) for _, b in found))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return [
        f"| {k} | {med[k]:.0f} | {statistics.median(waits[k]):.0f} % | {med[k] / med['workers']:.2f}× |"
        for k in rates
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64, help="500×375 JPEGs for (a)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-augment")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("(a) worker CPU ms per training image (decode + 2 views at 224 px), one process")
    print(
        "| JPEG | today's path | --augment-on device | ratio | decode (draft) | crop+resize+flip | appearance |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in part_a(args.work, args.images):
        print(row, flush=True)
    print(f"\n(b) appearance stage on a [{args.batch}, 3, 224, 224] uint8 batch, CPU")
    print("| implementation | ms | images/s | vs loop |")
    print("|---|---:|---:|---:|")
    for row in part_b(args.batch, args.rounds):
        print(row, flush=True)
    if not args.skip_train:
        print(
            f"\n(c) simclr train, resnet18 @ 32 px, CPU, batch 64, median of {args.rounds} rounds"
        )
        print("| --augment-on | img/s | data wait | vs workers |")
        print("|---|---:|---:|---:|")
        for row in part_c(args.work, args.train_steps, args.rounds):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
