"""Quality benchmark: does SimCLR training make the features better? (CIFAR-10 subset, CPU budget)

In one run:
1. unpack ``../shared/data/cifar10-small.tar.gz`` (10,000 train / 2,000 val JPEGs, 32 px) to a
   temporary folder;
2. ``simclr train`` on ``train/`` (labels ignored) for ``--budget-minutes`` with the product's own
   ``--time-budget`` (it measures its step rate and fixes the length once), or ``--steps N``;
3. ``simclr evaluate`` train → val for the trained checkpoint, the same architecture untrained
   (random init, same seed machinery) and raw pixels;
4. print a table (kNN and linear-probe top-1, training time, img/s) and, with ``--write-docs``,
   rewrite the Quality section of docs/benchmarks.md with it and the command.

    .venv/bin/python bench/quality.py --write-docs

Not a test: it needs the shared data file and ~30-40 minutes of a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from quality_report import docs_section, table, write_docs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARBALL = ROOT.parent / "shared" / "data" / "cifar10-small.tar.gz"
IMG_S = re.compile(r"step (\d+)/\d+ .* ([\d.]+) img/s")


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tarball", type=Path, default=DEFAULT_TARBALL, help="cifar10-small.tar.gz")
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=28.0,
        help="training wall-clock budget: simclr train --time-budget (unless --steps) [28]",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads per process (OMP_NUM_THREADS) for training and evaluation [2]",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="fixed training steps instead of the time budget"
    )
    p.add_argument(
        "--config",
        type=Path,
        default=ROOT / "configs" / "cpu-quick.yaml",
        help="the recipe: simclr train --config FILE plus budget/data flags only [cpu-quick.yaml]",
    )
    p.add_argument(
        "--train-args",
        default="",
        help="extra simclr train flags on top of --config (exploration runs; recorded)",
    )
    p.add_argument(
        "--compare",
        default="configs/cifar10-resnet18.yaml --stem standard --batch-size 128",
        help="a second recipe trained for the same budget in the same run: CONFIG [FLAGS] — "
        "what a user who follows the README's CPU advice gets from the CIFAR recipe; '' = none",
    )
    p.add_argument("--no-probe", action="store_true", help="kNN only (exploration runs)")
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip the untrained and raw-pixel evaluations (exploration runs)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--curve-every",
        type=int,
        default=0,
        help="also run the training-time kNN monitor every N epochs on a 3000/2000 "
        "subset (adds time; 0 = off) [0]",
    )
    p.add_argument(
        "--max-per-class",
        type=int,
        default=None,
        help="keep only this many train images per class (and a fifth as many val): "
        "a quick smoke run of the whole pipeline, numbers not comparable",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep data, run and JSON here (default: a temporary folder, removed)",
    )
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="rewrite the Quality section of docs/benchmarks.md",
    )
    return p.parse_args()


def run(cmd: list[str], log: Path) -> tuple[float, str]:
    """Run ``cmd`` (output to ``log`` and echoed), return (wall seconds, output); raise on failure."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if "img/s" in line or "kNN" in line or "top-1" in line or "error" in line:
                print("   ", line.rstrip(), flush=True)
        code = proc.wait()
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"command failed ({code}); see {log}")
    return seconds, log.read_text()


def train_cmd(recipe: list[str], data: Path, out: Path, steps: int | None, budget_min: float = 0) -> list[str]:  # fmt: skip
    """``simclr train`` with a recipe (``--config FILE`` [flags]) and only budget/data flags:
    ``steps`` fixed, or (None) the product's own ``--time-budget``."""
    length = ["--max-steps", str(steps)] if steps else ["--time-budget", f"{budget_min * 60:g}s"]
    return [
        sys.executable, "-m", "simclr_embed.cli", "train", *recipe,
        "--data", str(data), "--out", str(out), *length,
        "--log-every", "10", "--no-progress",
        "--checkpoint-every", str(10**9), "--keep-checkpoints", "0",
    ]  # fmt: skip


def steady_img_s(log: str) -> float:
    """Median img/s over the log points after the first (which includes worker start-up)."""
    rates = [float(m.group(2)) for m in IMG_S.finditer(log)]
    return statistics.median(rates[1:] or rates) if rates else float("nan")


def write_untrained(trained: Path, out: Path, seed: int) -> None:
    """Same config as the trained checkpoint, fresh random init (what step 0 of training sees)."""
    import torch

    from simclr_embed.training.checkpoint import FORMAT, load_checkpoint
    from simclr_embed.training.model import build_model

    cfg = load_checkpoint(trained)["config"]
    torch.manual_seed(seed)
    model = build_model(cfg)
    torch.save(
        {"format": FORMAT, "model": model.state_dict(), "config": cfg, "step": 0, "epoch": 0}, out
    )


def evaluate(
    model: str, data: Path, work: Path, name: str, image_size: int, probe: bool = True
) -> dict[str, Any]:
    out = work / f"eval-{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "simclr_embed.cli",
        "evaluate",
        "--model",
        model,
        "--train",
        str(data / "train"),
        "--val",
        str(data / "val"),
        "--json",
        str(out),
        "--image-size",
        str(image_size),
        "--workers",
        "2",
        *([] if probe else ["--probe-epochs", "0"]),
    ]
    seconds, _ = run(cmd, work / f"eval-{name}.log")
    report = json.loads(out.read_text())
    report["wall_seconds"] = seconds
    return report


def subset_for_curve(data: Path, work: Path) -> Path:
    """train: first 300 per class (the kNN bank), val: all 2000 (queries), as symlinks."""
    root = work / "curve"
    for cls in sorted(p.name for p in (data / "train").iterdir()):
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((data / "train" / cls).iterdir())[:300]:
            (root / "train" / cls / f.name).symlink_to(f)
        (root / "val" / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((data / "val" / cls).iterdir()):
            (root / "val" / cls / f.name).symlink_to(f)
    return root


def shrink(data: Path, per_class: int) -> None:
    """Delete all but the first ``per_class`` train (``per_class // 5`` val) images per class."""
    for part, keep in (("train", per_class), ("val", max(1, per_class // 5))):
        for cls in (data / part).iterdir():
            for f in sorted(cls.iterdir())[keep:]:
                f.unlink()


def train_and_eval(
    name: str, recipe: list[str], args: argparse.Namespace, data: Path, work: Path
) -> dict[str, Any]:
    """Train ``recipe`` for ``--steps`` or, by default, ``simclr train --time-budget`` (the
    product measures its own rate), then evaluate the checkpoint."""
    cmd = train_cmd(recipe, data / "train", work / f"run-{name}", args.steps, args.budget_minutes)
    if args.curve_every:
        cmd += ["--eval-data", str(subset_for_curve(data, work)), "--eval-every", str(args.curve_every)]  # fmt: skip
    train_s, log = run(cmd, work / f"train-{name}.log")
    resolved = json.loads((work / f"run-{name}" / "config.json").read_text())
    steps = int(resolved["total_steps"])
    plan = resolved.get("time_budget") or {}
    calib_rate = plan.get("images_per_s")
    ckpt = work / f"run-{name}" / "checkpoints" / "last.pt"
    report = evaluate(str(ckpt), data, work, name, resolved["image_size"], not args.no_probe)
    return {
        "name": name,
        "recipe": recipe,
        "steps": steps,
        "epochs": steps / resolved["steps_per_epoch"],
        "train_s": train_s,
        "img_s": steady_img_s(log),
        "calibration_img_s": calib_rate,
        "time_budget": plan,
        "resolved": resolved,
        "checkpoint": str(ckpt),
        "report": report,
        "curve": [
            (int(a), float(b)) for a, b in re.findall(r"step (\d+).*?kNN top-1 ([\d.]+)", log)
        ],
    }


def main() -> int:
    args = get_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # evaluation; the recipes set training's
    t_start = time.perf_counter()
    if not args.tarball.is_file():
        raise SystemExit(f"missing {args.tarball} (see ../shared/data/README.md)")
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="simclr-quality-")
        work = Path(tmp.name)
    else:
        work = args.work_dir
        work.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(args.tarball) as tar:
            tar.extractall(work, filter="data")
        data = work / "cifar10-small"
        if args.max_per_class:
            shrink(data, args.max_per_class)
        load0 = os.getloadavg()[0]
        recipes = [("cpu-quick", ["--config", str(args.config), *shlex.split(args.train_args)])]
        if args.compare:
            config, *flags = shlex.split(args.compare)
            recipes.append(("cifar-recipe", ["--config", str(ROOT / config), *flags]))
        runs = [train_and_eval(name, recipe, args, data, work) for name, recipe in recipes]
        main_run = runs[0]
        results = [(f"trained: {r['name']}", r["report"]) for r in runs]
        if not args.no_baselines:
            untrained = work / "untrained.pt"
            write_untrained(Path(main_run["checkpoint"]), untrained, args.seed)
            size = main_run["resolved"]["image_size"]
            probe = not args.no_probe
            results += [
                ("untrained (random init)", evaluate(str(untrained), data, work, "untrained", size, probe)),
                ("raw pixels", evaluate("pixels", data, work, "pixels", size, probe)),
            ]  # fmt: skip
        total_s = time.perf_counter() - t_start
        tbl = table(results, runs)
        knn = {name: r["knn"]["top1"] for name, r in results}
        verdict = ""
        if not args.no_baselines:
            base, pixels = knn["untrained (random init)"], knn["raw pixels"]
            gain = 100 * (knn[results[0][0]] - base)
            over_pixels = 100 * (knn[results[0][0]] - pixels)
            verdict = (
                f"cpu-quick: trained − untrained kNN **{gain:+.1f} points** (goal ≥ +15: "
                f"{'met' if gain >= 15 else 'NOT met'}), trained − raw pixels "
                f"**{over_pixels:+.1f}** (goal ≥ +10: {'met' if over_pixels >= 10 else 'NOT met'})."
            )
            if len(runs) > 1:
                verdict += (
                    f" The CIFAR recipe cut to the same budget: "
                    f"{100 * (knn[results[1][0]] - base):+.1f} over untrained."
                )
        cmdline = "python bench/quality.py " + shlex.join(sys.argv[1:])
        machine = (
            f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
            f", torch {__import__('torch').__version__}; load average at start {load0:.1f}"
        )
        print("\n" + tbl + "\n\n" + verdict)
        print(f"total bench time {total_s / 60:.1f} min")
        summary = {"knn": knn, "runs": runs, "results": dict(results), "total_seconds": total_s,
                   "command": cmdline, "machine": machine}  # fmt: skip
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if args.write_docs:
            write_docs(docs_section(args, tbl, verdict, cmdline, machine, runs, total_s))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
