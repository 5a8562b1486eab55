"""``simclr export-onnx``: checkpoint → verified ONNX model (+ optional fp16 / int8 / Triton repo).

    simclr export-onnx --checkpoint RUN/checkpoints/last.pt --output model.onnx
    simclr export-onnx --checkpoint last.pt --output model-int8.onnx --quantize int8 --calibration-data imgs/
    simclr export-onnx --checkpoint last.pt --output model.onnx --triton-repo triton/ --triton-name simclr

Exit codes: 0 ok, 1 runtime failure (bad checkpoint, failed parity check; nothing left at --output),
2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simclr_embed.errors import SimclrError

log = logging.getLogger(__name__)

TRITON_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path
    output: Path
    opset: int = 18
    fp16: bool = False
    quantize: str | None = None  # None | "int8"
    quantize_mode: str = (
        "auto"  # auto (static with --calibration-data, else dynamic) | static | dynamic
    )
    calibration_data: Path | None = None
    calibration_images: int = 64
    verify: bool = True
    exporter: str = "auto"  # auto | dynamo | torchscript
    triton_repo: Path | None = None
    triton_name: str = "simclr"
    triton_max_batch: int = 32
    triton_max_delay_us: int = 2000
    triton_instances: int = 1
    triton_kind: str = "auto"  # auto | cpu | gpu
    torch_program: Path | None = None
    seed: int = 0
    export_features: str = "backbone"  # backbone | head1 (SimCLRv2: the first projection layer)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simclr export-onnx",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a .pt written by 'simclr train'")
    p.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (17 or newer)")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="float16 weights (for GPUs); uint8 in / float32 out kept at the boundary",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="ONNX Runtime int8 quantization for CPU serving",
    )
    p.add_argument(
        "--quantize-mode",
        choices=["auto", "static", "dynamic"],
        default="auto",
        help="auto: static when --calibration-data is given, else dynamic",
    )
    p.add_argument(
        "--calibration-data",
        type=Path,
        default=None,
        help="folder of images (recursive) for static int8 calibration",
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        default=64,
        help="at most this many calibration images are used",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        # ArgumentDefaultsHelpFormatter would print "(default: True)", which reads as "off".
        help="skip the checker and the ONNX Runtime vs PyTorch parity check (by default they run)",
        default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--exporter",
        choices=["auto", "dynamo", "torchscript"],
        default="auto",
        help="torch.onnx exporter; auto: dynamo (torch.export + onnxscript) for opset >= 18, "
        "TorchScript for opset 17",
    )
    p.add_argument(
        "--triton-repo",
        type=Path,
        default=None,
        help="also write a Triton model repository DIR/<name>/1/model.onnx + config.pbtxt",
    )
    p.add_argument(
        "--triton-name", default="simclr", help="model name inside the Triton repository"
    )
    p.add_argument("--triton-max-batch", type=int, default=32, help="Triton max_batch_size")
    p.add_argument(
        "--triton-max-delay-us",
        type=int,
        default=2000,
        help="Triton dynamic_batching max_queue_delay_microseconds",
    )
    p.add_argument("--triton-instances", type=int, default=1, help="Triton instance_group count")
    p.add_argument(
        "--triton-kind",
        choices=["auto", "cpu", "gpu"],
        default="auto",
        help="Triton instance_group kind (KIND_AUTO/KIND_CPU/KIND_GPU)",
    )
    p.add_argument(
        "--torch-program",
        type=Path,
        default=None,
        metavar="PATH.pt2",
        help="also write a torch.export program of the same model (same input, outputs and "
        "metadata) for `simclr serve --model PATH.pt2` (torch runtime: bf16 on CUDA)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random verification images")
    p.add_argument(
        "--export-features",
        choices=("backbone", "head1"),
        default="backbone",
        help="what the 'features' output is: the backbone's pooled features, or the first "
        "projection layer's output as SimCLRv2 uses (metadata simclr.features_from) [backbone]",
    )
    return p


def parse_config(argv: Sequence[str] | None = None) -> ExportConfig:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.opset < 17:
        parser.error(f"argument --opset: must be 17 or newer, got {args.opset}")
    if args.fp16 and args.quantize:
        parser.error("argument --fp16: not allowed with --quantize (choose one precision)")
    if args.calibration_data is not None and not args.quantize:
        parser.error("argument --calibration-data: only used with --quantize int8")
    if args.quantize_mode == "static" and args.calibration_data is None:
        parser.error("argument --quantize-mode: 'static' needs --calibration-data")
    if args.calibration_images < 1:
        parser.error("argument --calibration-images: must be at least 1")
    if args.triton_max_batch < 1:
        parser.error("argument --triton-max-batch: must be at least 1")
    if args.triton_max_delay_us < 0:
        parser.error("argument --triton-max-delay-us: must be 0 or more")
    if args.triton_instances < 1:
        parser.error("argument --triton-instances: must be at least 1")
    if args.torch_program is not None and (args.fp16 or args.quantize):
        parser.error(
            "argument --torch-program: writes the fp32 program (the torch runtime picks bf16/fp16 "
            "on the GPU itself); export it without --fp16/--quantize"
        )
    if args.torch_program is not None and args.torch_program.suffix != ".pt2":
        parser.error(f"argument --torch-program: expected a .pt2 path, got {args.torch_program}")
    if not TRITON_NAME_RE.match(args.triton_name):
        parser.error(f"argument --triton-name: {args.triton_name!r} is not a valid model name")
    return ExportConfig(**vars(args))


def _export(cfg: ExportConfig) -> dict[str, Any]:
    from simclr_embed.export.onnx_export import export_checkpoint

    if not cfg.quantize:
        return export_checkpoint(
            cfg.checkpoint,
            cfg.output,
            opset=cfg.opset,
            fp16=cfg.fp16,
            verify=cfg.verify,
            exporter=cfg.exporter,
            seed=cfg.seed,
            features_from=cfg.export_features,
        )
    from simclr_embed.export.quantize import quantize_model

    if cfg.calibration_data is not None and not cfg.calibration_data.is_dir():
        # Checked before the (slow) export so a typo costs nothing.
        raise SimclrError(f"calibration folder not found: {cfg.calibration_data}")

    # int8 starts from the (verified) fp32 export, kept in a scratch folder next to nothing.
    with tempfile.TemporaryDirectory(prefix="simclr-export-") as scratch:
        fp32 = Path(scratch) / "fp32.onnx"
        report = export_checkpoint(
            cfg.checkpoint,
            fp32,
            opset=cfg.opset,
            verify=cfg.verify,
            exporter=cfg.exporter,
            seed=cfg.seed,
            features_from=cfg.export_features,
        )
        report["quantize"] = quantize_model(
            fp32,
            cfg.output,
            mode=cfg.quantize_mode,
            calibration_data=cfg.calibration_data,
            calibration_images=cfg.calibration_images,
            verify=cfg.verify,
            seed=cfg.seed,
        )
        report["fp32_parity"] = report.pop("parity", None)
        report["metadata"] = report["quantize"]["metadata"]
        report["output"] = str(cfg.output)
        report["bytes"] = cfg.output.stat().st_size
    return report


def print_report(report: dict[str, Any]) -> None:
    from simclr_embed.export.verify import format_parity

    for key in ("parity", "fp32_parity"):
        parity = report.get(key)
        if parity and "skipped" in parity:
            print(parity["skipped"])
        elif parity:
            for line in format_parity(
                parity, "fp32 ORT CPU vs PyTorch" if key == "fp32_parity" else "ORT CPU vs PyTorch"
            ):
                print(line)
    q = report.get("quantize")
    if q:
        print(
            f"int8 ({q['mode']}) vs fp32 on {q['held_images']} held images: "
            f"min_cos features={q['min_cosine']['features']:.5f} "
            f"projection={q['min_cosine']['projection']:.5f}; mean_cos features="
            f"{q['mean_cosine']['features']:.5f}"
        )
        if q.get("speed"):
            s = q["speed"]
            print(
                f"ORT CPU speed at batch {s['batch']}: fp32 {s['fp32_images_per_s']:.1f} img/s, "
                f"int8 {s['int8_images_per_s']:.1f} img/s, speed-up x{s['speedup']:.2f}"
            )
    meta = report["metadata"]
    print(
        f"wrote {report['output']} ({report['bytes'] / 1e6:.1f} MB) arch={meta['simclr.arch']} "
        f"size={meta['simclr.image_size']} F={meta['simclr.feature_dim']} "
        f"P={meta['simclr.projection_dim']} precision={meta['simclr.precision']} "
        f"version={meta['simclr.model_version']}"
    )
    if report.get("triton"):
        print(f"wrote Triton model {report['triton']['config']}")
    program = report.get("torch_program")
    if program:
        checked = "parity ok vs PyTorch at N=1,7" if program.get("parity") else "not verified"
        print(
            f"wrote torch program {program['output']} ({program['bytes'] / 1e6:.1f} MB, {checked})"
        )
    if not report.get("parity") and not report.get("fp32_parity"):
        print("parity check skipped (--no-verify)")


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = _export(cfg)
    if cfg.triton_repo is not None:
        from simclr_embed.export.triton import write_triton_repo

        report["triton"] = write_triton_repo(
            cfg.output,
            cfg.triton_repo,
            name=cfg.triton_name,
            max_batch_size=cfg.triton_max_batch,
            max_queue_delay_us=cfg.triton_max_delay_us,
            instances=cfg.triton_instances,
            kind=cfg.triton_kind,
        )
    if cfg.torch_program is not None:
        from simclr_embed.export.torch_program import export_torch_program

        report["torch_program"] = export_torch_program(
            cfg.checkpoint, cfg.torch_program, report["metadata"], verify=cfg.verify, seed=cfg.seed
        )
    print_report(report)
    from simclr_embed.training.tracking import log_export

    run = log_export(cfg.checkpoint, cfg.output)  # the run that trained it, if it used MLflow
    if run is not None:
        print(f"logged {cfg.output.name} to MLflow run {run}")
    return 0
