"""Start-up checks of the output folder and ``--resume`` (restoring every piece of state).

Checks run on rank 0 and their verdict is broadcast (``agree``), so every rank fails with the same
one-line reason instead of the others hanging in the next collective. The checkpoint is read by
every rank from the shared filesystem when each sees the same file as rank 0 (no pickled copy
through the process group: at ResNet-50 scale that costs seconds and host memory per rank);
otherwise rank 0 reads it and broadcasts it, so nodes need not share rank 0's filesystem.

A different world size (an elastic restart on fewer GPUs, a requeue onto another node count)
continues with the config's global batch and lr schedule: the position in the data is carried
over as images seen in the current epoch, the step counter follows it, and a warning says the
continuation is not bit-exact. The same world size resumes bit-exactly.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from simclr_embed.errors import SimclrError
from simclr_embed.training import distributed as dist
from simclr_embed.training.checkpoint import load_checkpoint, restore_rng_state

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Config keys that shape the model: a checkpoint with other values cannot be continued.
MODEL_KEYS = (
    ("arch", "--arch"),
    ("stem", "--stem"),
    ("image_size", "--image-size"),
    ("proj_dim", "--proj-dim"),
    ("proj_hidden", "--proj-hidden"),
    ("proj_layers", "--proj-layers"),
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
    "grayscale_prob",
    "augment_on",
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


def prepare_out_dir(out: Path, resume: str) -> bool:
    """Create ``OUT/checkpoints``; refuse to overwrite a run unless resuming it (nothing lost).

    ``resume``: ``no``, ``yes`` (``last.pt`` must exist) or ``auto`` (resume when it exists).
    Returns whether this run resumes.
    """
    last = out / "checkpoints" / "last.pt"
    if out.exists() and not out.is_dir():
        raise SimclrError(f"--out {out}: exists and is not a folder")
    if resume == "yes" and not last.is_file():
        raise SimclrError(
            f"--resume: no checkpoint to continue from at {last} (--resume auto starts fresh then)"
        )
    if resume == "no" and last.exists():
        raise SimclrError(
            f"--out {out} already holds a run ({last}); pass --resume (or --resume auto) to "
            "continue it, or choose another --out"
        )
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SimclrError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    return resume == "yes" or (resume == "auto" and last.is_file())


def _fingerprint(path: Path) -> tuple[int, str] | None:
    """(size, sha256 of the first and last MiB): enough to tell "the same file" across nodes."""
    try:
        size = path.stat().st_size
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
        return size, h.hexdigest()
    except OSError:
        return None


def read_checkpoint_everywhere(path: Path) -> dict[str, Any]:
    """The checkpoint on every rank: each reads it itself when all see rank 0's file, else rank 0
    reads it and broadcasts it."""
    ckpt = agree(lambda: load_checkpoint(path, map_location="cpu"))  # rank 0 validates it
    if not dist.is_distributed():
        assert ckpt is not None
        return ckpt
    mine = _fingerprint(path)
    same = mine is not None and mine == dist.broadcast_object(mine if dist.is_primary() else None)
    if dist.all_ranks(same):
        if not dist.is_primary():
            ckpt = load_checkpoint(path, map_location="cpu")
        logger.info("every rank read %s from the shared filesystem", path)
        return ckpt  # type: ignore[return-value]
    logger.info("not every rank sees %s: rank 0 sends it to the others", path)
    return dist.broadcast_object(ckpt)


def load_resume_state(
    path: Path,
    resolved: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> tuple[int, int, int]:
    """Restore model/optimizer/scheduler/scaler/RNG from ``path``; returns (step, epoch, batch)."""
    ckpt = read_checkpoint_everywhere(path)
    old = ckpt["config"]
    for key, flag in MODEL_KEYS:
        if old.get(key, 2 if key == "proj_layers" else None) != resolved[key]:
            raise SimclrError(
                f"--resume: {path} was trained with {key}={old.get(key)!r}, "
                f"but {flag} is {resolved[key]!r}"
            )
    changed = [k for k in EXACT_KEYS if k in old and old[k] != resolved[k]]
    relaid = (
        old.get("global_batch_size", resolved["global_batch_size"]) != resolved["global_batch_size"]
    )
    if changed and not relaid:
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
    if ckpt.get("rng") and not relaid:  # a new layout draws new views anyway
        restore_rng_state(ckpt["rng"])
    step, epoch, batch = (
        int(ckpt["step"]),
        int(ckpt.get("epoch", 0)),
        int(ckpt.get("batch_in_epoch", 0)),
    )
    if relaid:
        step, epoch, batch = _relay(old, resolved, step, epoch, batch, optimizer, scheduler)
    if batch >= resolved["steps_per_epoch"]:  # the epoch length changed: start the next one
        epoch, batch = epoch + 1, 0
    logger.info(
        "resumed from %s: step %d, epoch %d, batch %d of the epoch", path, step, epoch, batch
    )
    return step, epoch, batch


def _relay(
    old: dict[str, Any],
    new: dict[str, Any],
    step: int,
    epoch: int,
    batch: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, int, int]:
    """Carry the position over to another global batch; the schedule follows the new config."""
    seen = batch * int(old["global_batch_size"])  # images of the current epoch already used
    batch = seen // int(new["global_batch_size"])
    if new.get("max_steps") is None:  # a run of N epochs: steps follow the images
        step = epoch * int(new["steps_per_epoch"]) + batch
    peak = float(new["peak_lr"])
    for group in optimizer.param_groups:
        group["initial_lr"] = peak
    scheduler.base_lrs = [peak] * len(optimizer.param_groups)
    scheduler.last_epoch = step - 1
    scheduler.step()  # lr for `step` from the new warm-up/cosine over the new total
    logger.warning(
        "resuming a run of %d process(es) × %d (global batch %d) with %d × %d (global batch "
        "%d): the data order is laid out again, epoch %d continues at image %d, step %d of %d, "
        "peak lr %.4g → %.4g. Training continues correctly, but not bit-exactly as an "
        "uninterrupted run would.",
        old["world_size"], old["batch_size"], old["global_batch_size"],
        new["world_size"], new["batch_size"], new["global_batch_size"],
        epoch, seen, step, new["total_steps"], old["peak_lr"], peak,
    )  # fmt: skip
    return step, epoch, batch
