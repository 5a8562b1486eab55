"""Start-up checks of the output folder and ``--resume`` (restoring every piece of state).

Checks run on rank 0 and their verdict is broadcast (``agree``), so every rank fails with the same
one-line reason instead of the others hanging in the next collective. The checkpoint is read by
rank 0 and broadcast too: other nodes need not share rank 0's filesystem.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from simclr_embed.errors import SimclrError
from training import distributed as dist
from training.checkpoint import load_checkpoint, restore_rng_state

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Config keys that shape the model: a checkpoint with other values cannot be continued.
MODEL_KEYS = (
    ("arch", "--arch"),
    ("stem", "--stem"),
    ("image_size", "--image-size"),
    ("proj_dim", "--proj-dim"),
)
# Keys that change the sample order or the schedule: continuing works, but not exactly.
EXACT_KEYS = (
    "world_size",
    "global_batch_size",
    "num_images",
    "seed",
    "total_steps",
    "warmup_steps",
    "peak_lr",
    "optimizer",
    "color_strength",
    "blur",
)


def agree(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0; if it raises ``SimclrError`` every rank raises it. Returns its result
    on rank 0, None elsewhere."""
    error, result = None, None
    if dist.is_primary():
        try:
            result = fn()
        except SimclrError as exc:
            error = str(exc)
    error = dist.broadcast_object(error)
    if error:
        raise SimclrError(error)
    return result


def prepare_out_dir(out: Path, resume: bool) -> None:
    """Create ``OUT/checkpoints``; refuse to overwrite a run unless resuming it (nothing lost)."""
    last = out / "checkpoints" / "last.pt"
    if out.exists() and not out.is_dir():
        raise SimclrError(f"--out {out}: exists and is not a folder")
    if resume and not last.is_file():
        raise SimclrError(f"--resume: no checkpoint to continue from at {last}")
    if not resume and last.exists():
        raise SimclrError(
            f"--out {out} already holds a run ({last}); pass --resume to continue it "
            "or choose another --out"
        )
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SimclrError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None


def load_resume_state(
    path: Path,
    resolved: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> tuple[int, int, int]:
    """Restore model/optimizer/scheduler/scaler/RNG from ``path``; returns (step, epoch, batch)."""
    ckpt = agree(lambda: load_checkpoint(path, map_location="cpu"))
    ckpt = dist.broadcast_object(ckpt)
    old = ckpt["config"]
    for key, flag in MODEL_KEYS:
        if old.get(key) != resolved[key]:
            raise SimclrError(
                f"--resume: {path} was trained with {key}={old.get(key)!r}, "
                f"but {flag} is {resolved[key]!r}"
            )
    changed = [k for k in EXACT_KEYS if k in old and old[k] != resolved[k]]
    if changed:
        logger.warning(
            "resuming with changed %s: training continues, but not exactly as the "
            "uninterrupted run would have",
            ", ".join(changed),
        )
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("rng"):
        restore_rng_state(ckpt["rng"])
    step, epoch, batch = (
        int(ckpt["step"]),
        int(ckpt.get("epoch", 0)),
        int(ckpt.get("batch_in_epoch", 0)),
    )
    if batch >= resolved["steps_per_epoch"]:  # the epoch length changed: start the next one
        epoch, batch = epoch + 1, 0
    logger.info(
        "resumed from %s: step %d, epoch %d, batch %d of the epoch", path, step, epoch, batch
    )
    return step, epoch, batch
