"""``make demo`` / ``python -m simclr_embed.demo``: the whole product, end to end, in minutes.

1. data: the bundled synthetic sample set (``simclr_embed.demo.sample_data``) generated into
   ``OUT/data``, or ``--data DIR`` (``make demo DATA=DIR``);
2. ``simclr train`` a small SimCLR (resnet18 at 32 px, standard stem: CPU-friendly; ``--device
   auto`` so a GPU is used when there is one);
3. ``simclr export-onnx`` (parity check on) → ``OUT/model.onnx``; the same architecture untrained
   (same seed, step 0) → ``OUT/untrained.onnx``;
4. for each model: ``simclr serve`` on a free loopback port, wait for health SERVING, ``simclr
   embed`` every image → ``OUT/embeddings/*.npy``, measure served images/s, SIGTERM (exit 0);
5. report: images/s, embedding dimension, kNN label agreement trained vs untrained (labeled data
   only: ``DIR/<class>/...``; labels are never shown to training);
6. ``simclr neighbors --png`` on both embeddings → ``OUT/neighbors.png``: the same images with
   their nearest neighbours, trained model left, untrained right.

Every stage runs as its real CLI in a subprocess, exactly as a user would type it (the commands
are printed). A rerun overwrites ``OUT``. Servers are stopped in ``finally`` even when a step fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from simclr_embed.demo.steps import (
    cpu_training_plan,
    run_simclr,
    serve_and_embed,
    usable_cores,
    write_untrained_checkpoint,
)
from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_write_text


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    data: Path | None = None  # None: generate the sample set into OUT/data
    per_class: int = 100
    sample_size: int = 64
    arch: str = "resnet18"
    image_size: int = 32
    stem: str = "standard"
    # Training runs for a time, not a step count: CPUs differ ~5x in what they do in a minute
    # (native bf16 or AVX2-only fp32), and the demo's promise is in minutes. --steps N instead
    # fixes the length. Measured on the sample set (kNN agreement, untrained 37%; benchmarks.md
    # "Demo"): an AVX2-only CPU (63 img/s) gets ~148 steps of 128 in 5 minutes — 58% with LARS
    # lr 2.0, 46.5% with 1.0; in 3 minutes (88 steps) 43.5% / 35.5%. A bf16 CPU gets ~775 steps:
    # 76% with lr 2.0. lr 4.0 overshot (22% at 300 steps); T 0.5 scored 3 points under 0.2.
    time_budget: str = "5m"
    steps: int | None = None
    precision: str = "auto"
    batch_size: int = 128
    lr: float = 2.0
    temperature: float = 0.2
    color_strength: float = 1.0
    workers: int | None = None  # None: fitted to the cores (cpu_training_plan)
    device: str = "auto"
    seed: int = 0
    k: int = 20
    startup_timeout_s: float = 180.0


def get_args_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="python -m simclr_embed.demo", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--out", type=Path, default=d.out, help=f"artifacts folder (overwritten) [{d.out}]"
    )
    p.add_argument(
        "--data", type=Path, default=None, help="your image folder [generated sample set]"
    )
    p.add_argument("--per-class", type=int, default=d.per_class, help="sample images per class")
    p.add_argument("--sample-size", type=int, default=d.sample_size, help="sample image side (px)")
    p.add_argument("--arch", default=d.arch, help=f"ResNet to train [{d.arch}]")
    p.add_argument("--image-size", type=int, default=d.image_size, help="training size (px)")
    p.add_argument(
        "--stem", choices=("small", "medium", "standard"), default=d.stem, help="ResNet stem"
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--time-budget", default=d.time_budget, help=f"training time (simclr train --time-budget) [{d.time_budget}]")  # fmt: skip
    length.add_argument("--steps", type=int, default=None, help="a fixed number of training steps instead of a time budget")  # fmt: skip
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default=d.precision, help="training precision; fp32 shows what a CPU without native bf16 does [auto]")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch")
    p.add_argument("--lr", type=float, default=d.lr, help="base lr per 256 images (LARS)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="NT-Xent temperature")
    p.add_argument("--color-strength", type=float, default=d.color_strength, help="jitter strength")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers [by cores]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="[auto]")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for data, init and training")
    p.add_argument("--k", type=int, default=d.k, help="neighbours for the kNN report")
    return p


MARKER = ".simclr-demo"


def prepare_out(out: Path, data: Path | None) -> None:
    """Empty ``out`` for a fresh run, but only a folder an earlier demo made (never user data)."""
    if data is not None and out.resolve() in (data.resolve(), *data.resolve().parents):
        raise SimclrError(f"--out {out} contains --data {data}; choose another --out")
    if out.exists():
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise SimclrError(f"--out {out} exists and was not made by the demo; choose another")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by python -m simclr_embed.demo; deleted on rerun\n")


def draw_neighbors(runs: dict[str, dict], out: Path, k: int) -> Path | None:
    """``simclr neighbors --png`` for each model's embeddings (the same sampled images), then
    both sheets side by side in ``OUT/neighbors.png``: what each model calls similar."""
    try:
        import faiss  # noqa: F401  (the neighbors extra)
    except ImportError:
        print("\nskipping neighbors.png: FAISS is not installed (simclr-embed[neighbors])")
        return None
    from simclr_embed.neighbors.sheet import save_png, side_by_side

    sheets = []
    for name in ("trained", "untrained"):
        png = out / "neighbors" / f"{name}.png"
        run_simclr("neighbors", "--embeddings", runs[name]["embeddings"], "--k", str(min(k, 8)),
                   "--png", str(png), "--png-rows", "6", "--output", str(out / "neighbors" / name))  # fmt: skip
        sheets.append(Image.open(png))
    titles = ["trained: each row's image, then its nearest neighbours (cosine)", "untrained (step 0)"]  # fmt: skip
    save_png(side_by_side(sheets, titles), out / "neighbors.png")
    return out / "neighbors.png"


def format_report(
    cfg: DemoConfig,
    data: Path,
    train: dict,
    runs: dict[str, dict],
    wall_s: float,
    sheet: Path | None = None,
) -> str:
    t, u = runs["trained"], runs["untrained"]
    lines = [
        "",
        "=" * 72,
        "simclr-embed demo report",
        "=" * 72,
        f"data            {data}  ({t['n']} images)",
        f"training        {cfg.arch} @ {cfg.image_size} px, {train['steps']} steps × batch "
        f"{train['batch_size']} on {train['device']} ({train.get('precision', 'float32')}), "
        f"{train['seconds']:.0f} s",
        *_budget_lines(train),
        f"served          {t['images_per_s']:.0f} images/s (trained model, in-process client, "
        f"{t['n']} images; providers {', '.join(t['providers'])})",
        f"embedding       features, dimension {t['dim']} (model {t['version']})",
    ]
    if t["knn"] is not None and u["knn"] is not None:
        k = t["knn"]
        lines += [
            f"kNN agreement   k={cfg.k} cosine, {k['queries']} queries vs {k['bank']} labeled "
            f"neighbours, {k['classes']} classes",
            f"  trained       {100 * k['top1']:5.1f} %",
            f"  untrained     {100 * u['knn']['top1']:5.1f} %   (same architecture, step 0)",
            f"  chance        {100 * k['chance']:5.1f} %",
        ]
    else:
        lines.append("kNN agreement   skipped: the data has no class subfolders (unlabeled)")
    lines += [
        f"servers         stopped with SIGTERM: exit codes {t['server_exit_code']}, "
        f"{u['server_exit_code']}",
        "artifacts",
        f"  checkpoint    {cfg.out / 'train' / 'checkpoints' / 'last.pt'}",
        f"  TensorBoard   {cfg.out / 'train' / 'tb'}",
        f"  ONNX          {t['model']}   (untrained: {u['model']})",
        f"  embeddings    {t['embeddings']} (+ .paths.txt)   (untrained: {u['embeddings']})",
        f"  neighbours    {sheet or 'skipped (no FAISS)'}   (trained left, untrained right)",
        f"  server logs   {cfg.out / 'logs'}",
        f"  report        {cfg.out / 'report.json'}",
        f"wall time       {wall_s:.0f} s",
        "=" * 72,
    ]
    return "\n".join(lines)


def training_plan(device: str, workers: int | None) -> tuple[int, dict[str, str]]:
    """Workers and thread settings for ``simclr train``: cores split on a CPU, workers on a GPU."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return (workers if workers is not None else min(8, max(1, usable_cores() - 1))), {}
    return cpu_training_plan(workers)


def run_demo(cfg: DemoConfig) -> dict:
    t_start = time.perf_counter()
    out = cfg.out
    prepare_out(out, cfg.data)
    if cfg.data is None:
        from simclr_embed.demo.sample_data import CLASSES, generate

        data = out / "data"
        print(
            f"generating the sample data set: {len(CLASSES)} classes × {cfg.per_class} images, "
            f"{cfg.sample_size} px → {data}",
            flush=True,
        )
        generate(data, per_class=cfg.per_class, size=cfg.sample_size, seed=cfg.seed)
    else:
        data = cfg.data
        if not data.is_dir():
            raise SimclrError(f"--data {data}: not a folder")
    from simclr_embed.imageio import list_images

    n_images = len(list_images(data))
    if n_images < 16:
        raise SimclrError(f"--data {data}: {n_images} images; the demo needs at least 16")
    batch = min(cfg.batch_size, n_images)  # the loader drops a last partial batch

    run = out / "train"
    workers, env = training_plan(cfg.device, cfg.workers)
    t0 = time.perf_counter()
    # fmt: off
    length = (["--max-steps", str(cfg.steps), "--warmup-steps", str(cfg.steps // 10)]
              if cfg.steps else ["--time-budget", cfg.time_budget])  # warm-up: 10 % of the run
    run_simclr(
        "train", "--data", str(data), "--out", str(run), "--arch", cfg.arch,
        "--image-size", str(cfg.image_size), "--stem", cfg.stem, *length,
        "--batch-size", str(batch), "--lr", str(cfg.lr), "--precision", cfg.precision,
        "--temperature", str(cfg.temperature), "--color-strength", str(cfg.color_strength),
        "--workers", str(workers), "--device", cfg.device, "--seed", str(cfg.seed),
        "--checkpoint-every", str(10**9), "--keep-checkpoints", "0", "--log-every", "50",
        env=env,
    )
    # fmt: on
    resolved = json.loads((run / "config.json").read_text())
    train = {
        "steps": resolved["total_steps"],
        "batch_size": batch,
        "seconds": time.perf_counter() - t0,
        "device": resolved.get("device_type", cfg.device),
        "precision": resolved.get("amp_dtype", "float32"),
        "plan": resolved.get("time_budget"),
    }

    last = run / "checkpoints" / "last.pt"
    untrained_ckpt = write_untrained_checkpoint(last, out / "untrained" / "checkpoints" / "last.pt")
    print(f"\nwrote the untrained (step 0) checkpoint {untrained_ckpt}", flush=True)
    model, untrained = out / "model.onnx", out / "untrained.onnx"
    run_simclr("export-onnx", "--checkpoint", str(last), "--output", str(model))
    run_simclr(
        "export-onnx",
        "--checkpoint",
        str(untrained_ckpt),
        "--output",
        str(untrained),
        "--no-verify",
    )

    serve = {"device": cfg.device, "k": cfg.k, "startup_timeout_s": cfg.startup_timeout_s}
    runs = {
        "trained": serve_and_embed("trained", model, data, out, **serve),
        "untrained": serve_and_embed("untrained", untrained, data, out, **serve),
    }
    sheet = draw_neighbors(runs, out, cfg.k)
    wall = time.perf_counter() - t_start
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "data": str(data),
        "train": train,
        "runs": runs,
        "neighbors_png": str(sheet) if sheet else None,
        "wall_s": wall,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    print(format_report(cfg, data, train, runs, wall, sheet), flush=True)
    return report


# Demo training rates measured on 2-core CPUs (docs/benchmarks.md "Demo"): what the same budget
# gives elsewhere, so a reader of the report knows whether their machine is the slow one.
REFERENCE_RATES = (("an AVX2-only CPU (fp32)", 63.0), ("a CPU with native bf16", 160.0))


def _budget_lines(train: dict[str, Any]) -> list[str]:
    plan = train.get("plan")
    if not plan:
        return []
    per_img = plan["total_steps"] / max(plan["images_per_s"], 1e-9)  # steps per (img/s)
    elsewhere = "; ".join(f"~{round(per_img * r)} steps on {name} ({r:.0f} img/s)" for name, r in REFERENCE_RATES)  # fmt: skip
    return [
        f"                time budget {plan['budget_s'] / 60:g} min at {plan['images_per_s']:.0f} "
        f"img/s (measured) → {plan['total_steps']} steps; the same budget: {elsewhere}"
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = DemoConfig(**vars(args))
    if (cfg.steps is not None and cfg.steps < 1) or cfg.batch_size < 2 or cfg.per_class < 1:
        get_args_parser().error("--steps, --per-class must be >= 1 and --batch-size >= 2")
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    from simclr_embed.errors import run_main

    raise SystemExit(run_main(main))
