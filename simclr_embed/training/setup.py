"""Run set-up pieces of ``simclr_embed.training.train``: precision, seeding, the model, the resolved config."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simclr_embed.errors import SimclrError
from simclr_embed.training import distributed as dist
from simclr_embed.training.config import TrainConfig
from simclr_embed.training.model import (
    SimCLRModel,
    load_backbone_state,
    load_init_weights,
    torchvision_weights,
)
from simclr_embed.training.optim import scaled_lr

logger = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls in hardware (elsewhere bf16 is emulated, slower than
    fp32). Measured here: the medium stem trains ~1.7x faster under bf16 autocast."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch: read the CPU flags
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None for fp32, use GradScaler)``.

    ``auto``: bf16 on CUDA (fp16 + loss scaling without bf16); on the CPU bf16 where the CPU has
    it natively (:func:`cpu_has_native_bf16`), else fp32. Weights stay fp32 either way (autocast
    only lowers the matmul/conv precision), so checkpoints and exports are unaffected.
    """
    if precision == "auto":
        if device.type != "cuda":
            return (torch.bfloat16, False) if cpu_has_native_bf16() else (None, False)
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "bf16":
        return torch.bfloat16, False
    if precision == "fp16":
        return torch.float16, True  # fp16 overflows without loss scaling
    return None, False


SHORT_RUN_EPOCHS = 50  # below this, the long-run temperature (0.5) is the wrong default


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _init_weights(model: SimCLRModel, cfg: TrainConfig) -> None:
    spec = cfg.init_weights or ""
    if spec == "torchvision" or spec.startswith("torchvision:"):
        # Rank 0 fills the cache first, so N processes do not download one file N times.
        if not dist.is_primary():
            dist.barrier()
        try:
            state, name = torchvision_weights(cfg.arch, spec)
        finally:
            if dist.is_primary():
                dist.barrier()
        missing, unfit = load_backbone_state(model, state)
    else:
        if not Path(spec).is_file():
            raise SimclrError(f"--init-weights {spec}: no such file")
        name = spec
        missing, unfit = load_init_weights(model, spec)
    logger.info(
        "started the trunk from %s (%d keys not in it%s)",
        name,
        len(missing),
        f"; left out, not in the trunk or of another shape: {', '.join(unfit)}" if unfit else "",
    )


def build_model(
    cfg: TrainConfig, device: torch.device, world: int, resuming: bool = False
) -> nn.Module:
    """The SimCLR model on ``device`` (SyncBatchNorm across CUDA processes, channels_last)."""
    model: nn.Module = SimCLRModel(
        cfg.arch, cfg.stem, cfg.proj_dim, cfg.proj_hidden, cfg.proj_layers
    )
    if cfg.init_weights and not resuming:
        _init_weights(model, cfg)  # type: ignore[arg-type]
    if world > 1 and device.type == "cuda":
        # BatchNorm statistics over the global batch (the paper's "global BN").
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif world > 1:  # torch's SyncBatchNorm is CUDA-only (DDP refuses it on CPU)
        logger.warning("SyncBatchNorm needs CUDA: on CPU each process normalizes its own batch")
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def resolve_run(
    cfg: TrainConfig,
    *,
    num_images: int,
    steps_per_epoch: int,
    world: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    total_steps: int | None = None,
    warmup_steps: int | None = None,
) -> dict[str, Any]:
    """The resolved config: every ``TrainConfig`` field plus what the run derived from them.

    ``total_steps``/``warmup_steps``: a ``--time-budget`` plan's (``training.budget``).

    Saved as ``OUT/config.json`` and inside every checkpoint (export and evaluation read
    ``arch``, ``stem``, ``image_size``, ``proj_dim``, ``mean``, ``std``, ``resize`` from it).
    """
    total_steps = total_steps or cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if warmup_steps is None else warmup_steps
    if warmup is None:
        # The same fraction of the run whatever its length: --max-steps shortens the warm-up too.
        warmup = round(total_steps * min(1.0, cfg.warmup_epochs / cfg.epochs))
    if warmup > total_steps / 5:
        logger.warning(
            "warm-up is %d of %d steps (%.0f%% of the run): most of a short run at a low lr; "
            "lower --warmup-steps/--warmup-epochs",
            warmup,
            total_steps,
            100 * warmup / total_steps,
        )
    epochs_done = total_steps / max(steps_per_epoch, 1)
    if epochs_done < SHORT_RUN_EPOCHS and cfg.temperature >= 0.4:
        logger.warning(
            "a short run (%.1f epochs) with temperature %g: T=0.5 is the setting for long runs "
            "with big batches; short ones learn faster with 0.1-0.2 (configs/cpu-quick.yaml, "
            "docs/training.md 'Short runs')",
            epochs_done,
            cfg.temperature,
        )
    global_batch = cfg.batch_size * world
    return {
        **cfg.to_dict(),
        "world_size": world,
        "global_batch_size": global_batch,
        "peak_lr": scaled_lr(cfg.lr, global_batch, cfg.lr_scaling),
        "num_images": num_images,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": min(warmup, total_steps),
        "device_type": device.type,
        "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else "float32",
    }
