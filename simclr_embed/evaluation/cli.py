"""``simclr evaluate``: weighted kNN and linear-probe top-1 of frozen features on labeled folders.

    simclr evaluate --model runs/x/checkpoints/last.pt --train data/train --val data/val
    simclr evaluate --model model.onnx --train data/train --val data/val --json eval.json
    simclr evaluate --model pixels --image-size 32 --train ... --val ...   # raw-pixel baseline

Both folders hold one subfolder per class (the same classes). Features: the pooled backbone
output (``features``), embedded with the serving preprocessing; kNN: cosine, k, T = 0.07
(InstDisc/SimCLR); probe: L2-regularized multinomial logistic regression (L-BFGS) on
standardized features.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from simclr_embed.errors import SimclrError
from simclr_embed.evaluation.features import (
    Embedder,
    PixelEmbedder,
    TorchEmbedder,
    build_embedder,
    embed_paths,
)
from simclr_embed.evaluation.probe import linear_probe
from simclr_embed.fileio import atomic_write_text
from simclr_embed.labeled import check_same_classes, list_labeled
from simclr_embed.training.knn import knn_top1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    model: str
    train: str
    val: str
    k: int = 20
    knn_temperature: float = 0.07
    probe_epochs: int = 300
    probe_l2: float | None = None  # None: chosen on a held-out part of --train
    image_size: int = 32
    batch_size: int = 256
    workers: int = 4
    device: str = "auto"
    json: str | None = None
    baselines: tuple[str, ...] = ()  # untrained, pixels: scored the same way, printed beside
    progress: bool = True


def _l2(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simclr evaluate",
        description="kNN and linear-probe top-1 of frozen backbone features on labeled folders "
        "(one subfolder per class).",
    )
    p.add_argument(
        "--model",
        required=True,
        help="exported model (.onnx), training checkpoint (.pt), or 'pixels' for the "
        "raw-pixel baseline",
    )
    p.add_argument("--train", required=True, help="labeled folder the kNN/probe is fit on")
    p.add_argument("--val", required=True, help="labeled folder that is scored")
    p.add_argument("--k", type=int, default=20, help="neighbours for the weighted kNN [20]")
    p.add_argument(
        "--knn-temperature", type=float, default=0.07, help="kNN vote weight exp(cos/T) [0.07]"
    )
    p.add_argument(
        "--probe-epochs",
        type=int,
        default=300,
        help="full-batch L-BFGS iterations of the linear probe; 0 skips it [300]",
    )
    p.add_argument(
        "--probe-l2",
        type=_l2,
        default=None,
        metavar="L2|auto",
        help="L2 penalty of the probe weights; auto picks one of 1, 0.1, ..., 1e-4 by top-1 on "
        "a held-out fifth of --train [auto]",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=32,
        help="image size for --model pixels (models carry their own) [32]",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass [256]")
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="image decoding threads [min(4, CPUs)]",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model, kNN and probe run [auto: cuda if available]",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--baselines",
        type=_baselines,
        default=(),
        metavar="untrained,pixels",
        help="also score these the same way and print them beside the model: untrained = the "
        "same architecture at step 0 (seed 0), pixels = the raw-pixel input [none]",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


BASELINES = ("untrained", "pixels")


def _baselines(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in BASELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(BASELINES)}, got {text!r}")  # fmt: skip
    return names


def parse_config(argv: Sequence[str] | None = None) -> EvalConfig:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    checks = [
        (args.k >= 1, "--k must be >= 1"),
        (args.knn_temperature > 0, "--knn-temperature must be > 0"),
        (args.probe_epochs >= 0, "--probe-epochs must be >= 0"),
        (args.image_size >= 1, "--image-size must be >= 1"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.workers >= 1, "--workers must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    if args.model != "pixels" and Path(args.model).suffix not in (".onnx", ".pt"):
        parser.error(
            f"--model must be a .onnx file, a .pt checkpoint or 'pixels', got {args.model!r}"
        )
    if args.model == "pixels" and "untrained" in args.baselines:
        parser.error("--baselines untrained needs a model (.pt or .onnx), not --model pixels")
    return EvalConfig(**vars(args))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SimclrError("--device cuda: no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _score(
    cfg: EvalConfig,
    embedder: Embedder,
    data: tuple[list[Path], list[int], list[Path], list[int]],
    num_classes: int,
    device: torch.device,
    name: str,
) -> dict[str, Any]:
    """Embed both folders with ``embedder``; kNN and (unless skipped) the linear probe."""
    train_paths, train_labels, val_paths, val_labels = data
    log.info("embedding %d + %d images with %s", len(train_paths), len(val_paths), embedder.description)  # fmt: skip
    bar = (lambda what: f"{name}: {what}") if cfg.progress else (lambda what: None)
    t0 = time.perf_counter()
    xtr, _ = embed_paths(embedder, train_paths, cfg.batch_size, cfg.workers, bar("embed train"))
    xva, _ = embed_paths(embedder, val_paths, cfg.batch_size, cfg.workers, bar("embed val"))
    embed_s = time.perf_counter() - t0
    xtr_t, xva_t = torch.from_numpy(xtr).to(device), torch.from_numpy(xva).to(device)
    ytr, yva = torch.tensor(train_labels), torch.tensor(val_labels)
    knn = knn_top1(xtr_t, ytr.to(device), xva_t, yva, num_classes, cfg.k, cfg.knn_temperature)
    out: dict[str, Any] = {
        "model_description": embedder.description,
        "feature_dim": int(xtr.shape[1]),
        "image_size": embedder.image_size,
        "resize": embedder.resize,
        "embed_seconds": round(embed_s, 3),
        "images_per_second": round((len(train_paths) + len(val_paths)) / max(embed_s, 1e-9), 1),
        "knn": {"top1": knn, "k": min(cfg.k, len(train_paths)), "temperature": cfg.knn_temperature},
        "probe": None,
    }
    if cfg.probe_epochs > 0:
        t1 = time.perf_counter()
        probe = linear_probe(xtr_t, ytr, xva_t, yva, num_classes, cfg.probe_epochs, cfg.probe_l2,
                             progress=bar("linear probe"))  # fmt: skip
        out["probe"] = {
            "top1": probe.top1,
            "train_top1": probe.train_top1,
            "train_loss": probe.train_loss,
            "iterations": probe.iterations,
            "max_iterations": cfg.probe_epochs,
            "l2": probe.l2,
            "l2_auto": cfg.probe_l2 is None,
            "l2_heldout_top1": {f"{k:g}": v for k, v in probe.l2_scores.items()},
            "seconds": round(time.perf_counter() - t1, 3),
        }
    return out


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Embed both folders and score kNN and the linear probe (and each baseline the same way);
    returns the JSON-able report."""
    device = resolve_device(cfg.device)
    train_paths, train_labels, classes = list_labeled(cfg.train)
    val_paths, val_labels, val_classes = list_labeled(cfg.val)
    check_same_classes(classes, val_classes)
    data = (train_paths, train_labels, val_paths, val_labels)
    embedder = build_embedder(cfg.model, device, cfg.image_size)
    report: dict[str, Any] = {
        "model": cfg.model,
        "train": cfg.train,
        "val": cfg.val,
        "classes": classes,
        "num_train": len(train_paths),
        "num_val": len(val_paths),
        **_score(cfg, embedder, data, len(classes), device, "model"),
        "chance": 1.0 / len(classes),
        "baselines": {},
        "config": asdict(cfg),
    }
    for name in cfg.baselines:
        base: Embedder = (
            TorchEmbedder.untrained(cfg.model, device, metadata=getattr(embedder, "metadata", None))
            if name == "untrained"
            else PixelEmbedder(embedder.image_size)  # at the model's own input size
        )
        report["baselines"][name] = _score(cfg, base, data, len(classes), device, name)
    return report


def format_report(r: dict[str, Any]) -> str:
    rows = [
        ("model", r["model_description"]),
        ("train", f"{r['num_train']} images, {len(r['classes'])} classes ({r['train']})"),
        ("val", f"{r['num_val']} images ({r['val']})"),
        (
            "features",
            f"{r['feature_dim']}-d, {r['image_size']} px ({r['resize']}), "
            f"{r['images_per_second']:.0f} img/s",
        ),
        (
            "kNN top-1",
            f"{100 * r['knn']['top1']:6.2f}%  (k={r['knn']['k']}, "
            f"T={r['knn']['temperature']:g}, cosine)",
        ),
    ]
    if r["probe"] is not None:
        p = r["probe"]
        rows.append(
            (
                "probe top-1",
                f"{100 * p['top1']:6.2f}%  (train {100 * p['train_top1']:.2f}%, "
                f"L-BFGS {p['iterations']} it, l2={p['l2']:g}"
                f"{' auto' if p['l2_auto'] else ''})",
            )
        )
    rows.append(("chance", f"{100 * r['chance']:6.2f}%"))
    text = "\n".join(f"{name:<12} {value}" for name, value in rows)
    if r.get("baselines"):

        def cell(p: dict[str, Any] | None) -> str:
            return f"{100 * p['top1']:6.2f}%" if p else "     -"

        lines = ["", f"{'':<12} {'kNN top-1':>10} {'probe top-1':>12}"]
        for name, res in [("model", r), *r["baselines"].items()]:
            lines.append(f"{name:<12} {cell(res['knn']):>10} {cell(res['probe']):>12}")
        lines.append(f"{'chance':<12} {100 * r['chance']:9.2f}%")
        text += "\n".join(lines)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv)
    report = evaluate(cfg)
    print(format_report(report))
    if cfg.json:
        atomic_write_text(cfg.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {cfg.json}")
    return 0
