"""ONNX Runtime throughput of the exported encoder: fp32 vs int8 (and fp16 on CUDA), one run.

1. Builds a checkpoint (``--arch`` at ``--image-size``, random weights, BatchNorm statistics moved
   by two train-mode passes) or takes ``--checkpoint``; exports it with both exporters (export
   time, node count; the TorchScript graph is timed too); quantizes it to int8 (static, calibrated
   on synthetic sample images brought to S×S by the model's resize policy; and dynamic); on CUDA
   also exports fp16.
2. For each batch size, runs every variant in interleaved rounds (fp32, int8, ..., fp32, ...)
   so a noisy shared machine slows all alike; reports the median round as images/s and the ratio
   to fp32 of the same provider.

CPU::   python bench/export.py                      (resnet50, 224 px, batches 1 8 32)
Quick:: python bench/export.py --arch resnet18 --image-size 64 --budget-s 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import onnxruntime as ort
import torch

from simclr_embed.demo.sample_data import generate
from simclr_embed.export.onnx_export import export_checkpoint, export_encoder, load_encoder
from simclr_embed.export.quantize import quantize_model
from simclr_embed.training.checkpoint import FORMAT
from simclr_embed.training.model import SimCLRModel, default_stem


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet50", help="torchvision ResNet")
    p.add_argument("--image-size", type=int, default=224, help="model input size S")
    p.add_argument("--checkpoint", type=Path, default=None, help="use this checkpoint instead")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--budget-s",
        type=float,
        default=20.0,
        help="seconds of timed rounds per batch size (at least --min-rounds)",
    )
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--max-rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT default)")
    p.add_argument("--calibration-images", type=int, default=32)
    p.add_argument(
        "--no-dynamic", dest="dynamic", action="store_false", help="skip the dynamic int8 variant"
    )
    p.add_argument(
        "--no-torchscript",
        dest="torchscript",
        action="store_false",
        help="skip timing the TorchScript exporter's fp32 graph",
    )
    return p


def make_checkpoint(arch: str, size: int, path: Path) -> Path:
    torch.manual_seed(0)
    stem = default_stem(size)
    model = SimCLRModel(arch, stem, 128).train()
    with torch.no_grad():  # move BatchNorm statistics off their init values
        for _ in range(2):
            model(torch.rand(4, 3, size, size) * 2 - 0.5)
    cfg = {"arch": arch, "stem": stem, "image_size": size, "proj_dim": 128}
    torch.save({"format": FORMAT, "model": model.state_dict(), "config": cfg, "step": 0}, path)
    return path


def session(path: Path, provider: str, threads: int) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    providers = (
        [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    )
    s = ort.InferenceSession(str(path), opts, providers=providers)
    if s.get_providers()[0] != provider:
        raise RuntimeError(f"{path.name}: {provider} not in use ({s.get_providers()})")
    return s


def time_round_robin(
    sessions: dict[str, Any], batch: np.ndarray, args: argparse.Namespace
) -> dict[str, float]:
    """Median images/s per session over interleaved rounds on the same uint8 batch."""
    for s in sessions.values():
        s.run(None, {"images": batch})  # warm-up
    times: dict[str, list[float]] = {name: [] for name in sessions}
    deadline = time.monotonic() + args.budget_s
    rounds = 0
    while rounds < args.max_rounds and (rounds < args.min_rounds or time.monotonic() < deadline):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"images": batch})
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: len(batch) / statistics.median(t) for name, t in times.items()}


def exporter_table(ckpt: Path, size: int) -> list[str]:
    encoder, _ = load_encoder(ckpt)
    lines = ["| exporter | opset | export s | nodes |", "|---|---|---|---|"]
    for exporter, opset in (("dynamo", 18), ("torchscript", 18), ("torchscript", 17)):
        t0 = time.perf_counter()
        proto = export_encoder(encoder, size, opset=opset, exporter=exporter)
        lines.append(
            f"| {exporter} | {opset} | {time.perf_counter() - t0:.1f} | {len(proto.graph.node)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    if cuda and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp_name:
        tmp = Path(tmp_name)
        ckpt = args.checkpoint or make_checkpoint(args.arch, args.image_size, tmp / "ckpt.pt")
        print(
            f"# {args.arch} at {args.image_size} px; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs; onnxruntime {ort.__version__}, torch {torch.__version__}"
        )
        print("\n".join(exporter_table(ckpt, args.image_size)), "\n")

        models = {"fp32": tmp / "fp32.onnx"}
        export_checkpoint(ckpt, models["fp32"], verify=False)
        if args.torchscript:  # same weights through the other exporter: does the graph run slower?
            models["fp32-torchscript"] = tmp / "fp32-ts.onnx"
            export_checkpoint(
                ckpt, models["fp32-torchscript"], exporter="torchscript", verify=False
            )
        calib = tmp / "calib"
        per_class = max(1, (args.calibration_images + 16) // 8)
        generate(calib, per_class=per_class, size=round(args.image_size / 0.875), seed=1)
        reports = {
            "int8-static": quantize_model(
                models["fp32"],
                tmp / "int8s.onnx",
                calibration_data=calib,
                calibration_images=args.calibration_images,
                measure_speed=False,
                verify=False,
            )
        }
        models["int8-static"] = tmp / "int8s.onnx"
        if args.dynamic:
            reports["int8-dynamic"] = quantize_model(
                models["fp32"], tmp / "int8d.onnx", measure_speed=False, verify=False
            )
            models["int8-dynamic"] = tmp / "int8d.onnx"
        for name, r in reports.items():
            print(
                f"{name}: min cosine to fp32 features {r['min_cosine']['features']:.4f} "
                f"(mean {r['mean_cosine']['features']:.4f}) on {r['held_images']} {r['held_source']}"
            )
        variants = {(name, "CPUExecutionProvider"): path for name, path in models.items()}
        if cuda:
            export_checkpoint(ckpt, tmp / "fp16.onnx", fp16=True, verify=False)
            variants[("fp32", "CUDAExecutionProvider")] = models["fp32"]
            variants[("fp16", "CUDAExecutionProvider")] = tmp / "fp16.onnx"
        sessions = {key: session(path, key[1], args.threads) for key, path in variants.items()}

        rng = np.random.default_rng(0)
        names = [f"{n} ({p.removesuffix('ExecutionProvider')})" for n, p in sessions]
        print("\n| batch | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for b in args.batch_sizes:
            batch = rng.integers(0, 256, (b, args.image_size, args.image_size, 3), dtype=np.uint8)
            ips = time_round_robin(
                {n: s for n, s in zip(names, sessions.values(), strict=True)}, batch, args
            )
            cells = []
            for (variant, provider), name in zip(sessions, names, strict=True):
                base = ips[names[list(sessions).index(("fp32", provider))]]
                cells.append(
                    f"{ips[name]:.1f}"
                    + ("" if variant == "fp32" else f" (×{ips[name] / base:.2f})")
                )
            print(f"| {b} | " + " | ".join(cells) + " |", flush=True)
    print(
        f"\nimages/s (median round; ×: vs fp32 on the same provider); total {time.monotonic() - t_start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
