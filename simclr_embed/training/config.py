"""``simclr train`` configuration: one frozen dataclass, built from argparse (+ a YAML/TOML file).

Precedence: command-line flags > ``--config FILE`` > built-in defaults. The file holds the same
keys as the flags (``batch_size`` or ``batch-size``); its values are fed through the parser as if
they had been typed before the real flags, so they get the same type checks and error messages and
any flag given on the command line wins. Every bad value exits 2 with a message naming the flag.
(Long because every training flag, its help and its check live here, readable without torch.)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simclr_embed.imageio import IMAGENET_MEAN, IMAGENET_STD, resize_policy_for

# The ResNet trunks and stems simclr_embed.training.model builds; here so `--help` needs no torch import.
STEMS = ("small", "medium", "standard")
ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    arch: str = "resnet50"
    image_size: int = 224
    stem: str = "standard"  # always resolved (small when image_size <= 64 unless given)
    batch_size: int = 256  # per process
    chunk_size: int | None = None  # gradient caching: rows per forward with grad (gradcache.py)
    epochs: int = 100
    max_steps: int | None = None  # when set: the whole run's length in optimizer steps
    time_budget_s: float | None = None  # when set: the length from the measured rate (budget.py)
    lr: float = 0.3  # base lr per 256 images
    lr_scaling: str = "linear"
    optimizer: str = "lars"
    weight_decay: float = 1e-6
    warmup_epochs: float = 10.0
    warmup_steps: int | None = None  # overrides warmup_epochs
    temperature: float = 0.1
    proj_dim: int = 128
    proj_hidden: int | None = None  # projection head's hidden width (None: the feature width)
    proj_layers: int = 2  # linear layers in the projection head (SimCLRv2: 3)
    color_strength: float = 1.0
    grayscale_prob: float = 0.2
    augment_on: str = "auto"  # auto | workers | device
    blur: bool = True  # resolved: off for images <= 64 px unless given
    workers: int = 4
    threads: int | None = None  # torch CPU threads (None: torch's default)
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    resume: str = "no"  # no | yes (last.pt must exist) | auto (resume when it exists)
    init_weights: str | None = None
    eval_data: str | None = None
    eval_every: int = 1
    log_every: int = 50
    progress: bool = True
    log_format: str = "text"  # text | json (simclr_embed.logs)
    logger: str = "tensorboard"  # comma-separated: tensorboard, mlflow (training/tracking.py)
    mlflow_experiment: str | None = None
    stop_after_steps: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples → lists) plus derived keys the exporter/evaluator read."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["resize"] = resize_policy_for(self.image_size)
        return d


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simclr train",
        description="Train SimCLR on a folder of images (single process, or under torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or TOML file of defaults (same keys as the flags; flags win)",
    )
    g = p.add_argument_group("data and output")
    g.add_argument(
        "--data", metavar="DIR", help="folder of images, searched recursively (required)"
    )
    g.add_argument(
        "--out", metavar="DIR", help="output folder: checkpoints/, tb/, config.json (required)"
    )
    g.add_argument(
        "--eval-data",
        metavar="DIR",
        help="labeled folder (one subfolder per class) for the kNN monitor",
    )
    g.add_argument("--eval-every", type=int, default=1, help="epochs between kNN evaluations")
    g.add_argument(
        "--workers", type=int, default=_default_workers(), help="DataLoader workers per process"
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per process (CPU training: cores minus workers is a good start)",
    )
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="resnet50", choices=ARCHS, help="torchvision ResNet trunk")
    m.add_argument("--image-size", type=int, default=224, help="training crop size (px)")
    m.add_argument(
        "--stem",
        choices=STEMS,
        default=None,
        help="small = 3x3 conv, stride 1, no max-pool (layer1 at full size); medium = the same "
        "conv + the max-pool (half size); standard = torchvision's (quarter size); "
        "default small when --image-size <= 64",
    )
    m.add_argument("--proj-dim", type=int, default=128, help="projection head output size")
    m.add_argument(
        "--proj-hidden",
        type=int,
        default=None,
        help="projection head hidden width (default: the trunk's feature width)",
    )
    m.add_argument(
        "--proj-layers",
        type=int,
        default=2,
        metavar="N",
        help="linear layers in the projection head: 2 (SimCLR) or 3 (SimCLRv2) [2]",
    )
    m.add_argument(
        "--init-weights",
        metavar="PATH|torchvision[:NAME]",
        help="start the trunk from a local state_dict, or from torchvision's ImageNet weights of "
        "--arch (DEFAULT or a name such as IMAGENET1K_V1; torchvision's cache, downloaded once)",
    )
    o = p.add_argument_group("optimization")
    o.add_argument("--batch-size", type=int, default=256, help="images per process per step")
    o.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        metavar="C",
        help="gradient caching: run the step's forward/backward C views at a time (the same "
        "gradient as the whole batch in the memory of C; must divide --batch-size) [off]",
    )
    o.add_argument(
        "--epochs", type=int, default=100, help="epochs (ignored when --max-steps is given)"
    )
    o.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="total optimizer steps; lays out the lr schedule",
    )
    o.add_argument(
        "--time-budget",
        type=_duration,
        default=None,
        metavar="DURATION",
        dest="time_budget_s",
        help="train for this long (45m, 2h, 90s, 1h30m) instead of a step count: the run's "
        "length is fixed from its measured step rate so it ends on time with the lr schedule "
        "complete; exclusive with --max-steps/--epochs",
    )
    o.add_argument(
        "--lr", type=float, default=0.3, help="base lr per 256 images (scaled by the global batch)"
    )
    o.add_argument(
        "--lr-scaling",
        choices=("linear", "sqrt"),
        default="linear",
        help="lr = base × B/256 or base × √(B/256)",
    )
    o.add_argument(
        "--optimizer", choices=("lars", "sgd", "adamw"), default="lars", help="optimizer"
    )
    o.add_argument(
        "--weight-decay", type=float, default=1e-6, help="weight decay (not on biases/norms)"
    )
    o.add_argument(
        "--warmup-epochs", type=float, default=10.0, help="linear lr warmup length in epochs"
    )
    o.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="warmup length in steps (overrides --warmup-epochs)",
    )
    o.add_argument("--temperature", type=float, default=0.1, help="NT-Xent temperature")
    o.add_argument(
        "--color-strength",
        type=float,
        default=1.0,
        help="colour-jitter strength s (0.5 is usual at 32 px)",
    )
    o.add_argument(
        "--augment-on",
        choices=("auto", "workers", "device"),
        default="auto",
        help="where colour jitter, grayscale and blur run: in the DataLoader workers per image, "
        "or on the whole batch on the training device (workers only decode and crop); auto = "
        "device on CUDA, workers on the CPU",
    )
    o.add_argument(
        "--grayscale-prob",
        type=float,
        default=0.2,
        help="probability of turning a view gray (the paper: 0.2)",
    )
    o.add_argument(
        "--blur",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Gaussian blur augmentation; default on above 64 px",
    )
    o.add_argument("--seed", type=int, default=0, help="seed for init, sampling and augmentation")
    r = p.add_argument_group("runtime")
    r.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda if available"
    )
    r.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="auto = bf16 autocast on CUDA, and on a CPU with native bf16 (AVX512-BF16/AMX); "
        "fp32 elsewhere",
    )
    r.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the model",
    )
    r.add_argument(
        "--checkpoint-every", type=int, default=1000, help="steps between checkpoint writes"
    )
    r.add_argument(
        "--keep-checkpoints",
        type=int,
        default=3,
        help="how many step-N.pt to keep (0: only last.pt)",
    )
    r.add_argument(
        "--resume",
        nargs="?",
        const="yes",
        default="no",
        type=_resume_mode,
        metavar="auto",
        help="continue exactly from OUT/checkpoints/last.pt (it must exist); '--resume auto': "
        "continue when it exists, else start fresh — the same command for the first launch and "
        "every restart (torchrun --max-restarts, SLURM requeue, a Job restart)",
    )
    r.add_argument(
        "--stop-after-steps",
        type=int,
        default=None,
        help="stop (with a checkpoint) once this many steps are done, schedule unchanged; continue with --resume",
    )
    r.add_argument(
        "--log-every", type=int, default=50, help="steps between log lines / TensorBoard points"
    )
    r.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tqdm progress bar on rank 0",
    )
    r.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one object per line (time, level, logger, message) [text]",
    )
    r.add_argument(
        "--logger",
        default="tensorboard",
        metavar="tensorboard[,mlflow]",
        help="where metrics go: TensorBoard (OUT/tb) and/or MLflow (MLFLOW_TRACKING_URI; the "
        "mlflow extra) [tensorboard]",
    )
    r.add_argument("--mlflow-experiment", default=None, help="MLflow experiment name [MLflow's default]")  # fmt: skip
    return p


def _duration(value: str) -> float:
    from simclr_embed.training.budget import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


LENGTH_FLAGS = ("--max-steps", "--epochs")


def _given(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _length_conflict(
    file_keys: set[str], argv: Sequence[str], parser: argparse.ArgumentParser
) -> set[str]:
    """--time-budget and --max-steps/--epochs name the run's length two ways: both on the command
    line (or both in the file) is an error; across the two, the command line wins. Returns the
    file keys the command line overrides this way."""
    cli_budget = _given(argv, "--time-budget")
    cli_length = [f for f in LENGTH_FLAGS if _given(argv, f)]
    if cli_budget and cli_length:
        parser.error(f"argument --time-budget: not allowed with {cli_length[0]} (one way to say how long)")  # fmt: skip
    file_budget = "time_budget_s" in file_keys or "time_budget" in file_keys
    file_length = [k for k in ("max_steps", "epochs") if k in file_keys]
    if file_budget and "max_steps" in file_keys and not cli_budget and not cli_length:
        parser.error("argument --config: time_budget and max_steps both set in the file")
    if cli_budget:
        return set(file_length) - {"epochs"}  # epochs still sets the warm-up fraction
    if cli_length:
        return {"time_budget", "time_budget_s"} & file_keys
    return set()


def _resume_mode(value: str) -> str:
    """``--resume`` [yes] / ``--resume auto``; a config file may say true/false/auto."""
    v = str(value).strip().lower()
    modes = {"yes": "yes", "true": "yes", "1": "yes", "auto": "auto", "no": "no", "false": "no"}
    if v not in modes:
        raise argparse.ArgumentTypeError(f"expected 'auto' (or nothing), got {value!r}")
    return modes[v]


def _load_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        parser.error(f"argument --config: no such file: {path}")
    try:
        if file.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                parser.error("argument --config: TOML files need Python >= 3.11; use YAML")
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        else:
            import yaml

            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except Exception as exc:  # syntax errors of either format
        parser.error(f"argument --config: cannot parse {path}: {str(exc).splitlines()[0]}")
    if not isinstance(data, dict):
        parser.error(f"argument --config: {path} must hold a mapping of flag names to values")
    return data


def _file_to_argv(data: dict[str, Any], parser: argparse.ArgumentParser, path: str) -> list[str]:
    """Turn ``{key: value}`` into flags, so argparse type-checks them and real flags win."""
    actions = {
        a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")
    }
    by_flag = {a.option_strings[0]: a for a in actions.values()}  # time_budget → --time-budget
    argv: list[str] = []
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        action = actions.get(key) or by_flag.get("--" + key.replace("_", "-"))
        if action is None:
            parser.error(f"argument --config: unknown key {raw_key!r} in {path}")
        flag = action.option_strings[0]
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
            if not isinstance(value, bool):
                parser.error(f"argument {flag}: expected true/false in {path}, got {value!r}")
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else f"--no-{flag[2:]}")
            elif value:
                argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse flags (and ``--config``) into a validated ``TrainConfig``; exit 2 on bad usage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        data = _load_file(known.config, parser)
        keys = {str(k).replace("-", "_") for k in data}
        dropped = _length_conflict(keys, argv, parser)
        data = {k: v for k, v in data.items() if str(k).replace("-", "_") not in dropped}
        argv = _file_to_argv(data, parser, known.config) + argv
    else:
        _length_conflict(set(), argv, parser)
    args = parser.parse_args(argv)
    return config_from_args(args, parser)


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainConfig:
    def bad(flag: str, why: str) -> None:
        parser.error(f"argument {flag}: {why}")

    for flag in ("--data", "--out"):
        if not getattr(args, flag[2:]):
            parser.error(f"the following arguments are required: {flag}")
    checks = [
        ("--image-size", args.image_size >= 16, "must be >= 16"),
        (
            "--batch-size",
            args.batch_size >= 2,
            "must be >= 2 (BatchNorm and the contrastive loss need pairs)",
        ),
        (
            "--chunk-size",
            args.chunk_size is None
            or (args.chunk_size >= 2 and args.batch_size % args.chunk_size == 0),
            f"must be >= 2 and divide --batch-size {args.batch_size} (a chunk holds one view "
            "of each of its samples, never both)",
        ),
        ("--epochs", args.epochs >= 1, "must be >= 1"),
        ("--max-steps", args.max_steps is None or args.max_steps >= 1, "must be >= 1"),
        ("--lr", args.lr > 0, "must be > 0"),
        ("--weight-decay", args.weight_decay >= 0, "must be >= 0"),
        ("--warmup-epochs", args.warmup_epochs >= 0, "must be >= 0"),
        ("--warmup-steps", args.warmup_steps is None or args.warmup_steps >= 0, "must be >= 0"),
        ("--temperature", args.temperature > 0, "must be > 0"),
        ("--proj-dim", args.proj_dim >= 1, "must be >= 1"),
        ("--proj-hidden", args.proj_hidden is None or args.proj_hidden >= 1, "must be >= 1"),
        ("--proj-layers", 1 <= args.proj_layers <= 8, "must be in [1, 8]"),
        ("--grayscale-prob", 0 <= args.grayscale_prob <= 1, "must be in [0, 1]"),
        (
            "--color-strength",
            0 <= args.color_strength <= 2.5,
            "must be in [0, 2.5] (hue jitter 0.2·s <= 0.5)",
        ),
        ("--workers", args.workers >= 0, "must be >= 0"),
        ("--threads", args.threads is None or args.threads >= 1, "must be >= 1"),
        ("--checkpoint-every", args.checkpoint_every >= 1, "must be >= 1"),
        ("--keep-checkpoints", args.keep_checkpoints >= 0, "must be >= 0"),
        ("--eval-every", args.eval_every >= 1, "must be >= 1"),
        ("--log-every", args.log_every >= 1, "must be >= 1"),
        (
            "--logger",
            bool(args.logger) and set(args.logger.split(",")) <= {"tensorboard", "mlflow"},
            f"must be tensorboard, mlflow or both comma-separated, got {args.logger!r}",
        ),
        (
            "--stop-after-steps",
            args.stop_after_steps is None or args.stop_after_steps >= 1,
            "must be >= 1",
        ),
    ]
    for flag, ok, why in checks:
        if not ok:
            bad(flag, why)
    stem = args.stem or ("small" if args.image_size <= 64 else "standard")
    blur = args.blur if args.blur is not None else args.image_size > 64
    return TrainConfig(
        data=str(args.data),
        out=str(args.out),
        arch=args.arch,
        image_size=args.image_size,
        stem=stem,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        time_budget_s=args.time_budget_s,
        lr=args.lr,
        lr_scaling=args.lr_scaling,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        warmup_steps=args.warmup_steps,
        temperature=args.temperature,
        proj_dim=args.proj_dim,
        proj_hidden=args.proj_hidden,
        proj_layers=args.proj_layers,
        color_strength=args.color_strength,
        grayscale_prob=args.grayscale_prob,
        augment_on=args.augment_on,
        blur=blur,
        workers=args.workers,
        threads=args.threads,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        init_weights=args.init_weights,
        eval_data=args.eval_data,
        eval_every=args.eval_every,
        log_every=args.log_every,
        progress=args.progress,
        log_format=args.log_format,
        logger=args.logger,
        mlflow_experiment=args.mlflow_experiment,
        stop_after_steps=args.stop_after_steps,
    )
