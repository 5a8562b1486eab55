"""SimCLR training: ``train_one_epoch`` and ``main(cfg)``, one code path for 1 or N processes.

Single process (GPU if there is one): ``python -m simclr_embed.training --data DIR --out runs/a``.

One node, 8 GPUs (DDP, SyncBatchNorm, negatives gathered from all GPUs)::

    torchrun --standalone --nproc-per-node 8 -m simclr_embed.training --data DIR --out runs/a

Several nodes: the same command on each, plus ``--nnodes M --rdzv-backend c10d
--rdzv-endpoint HOST:29500 --rdzv-id RUN``. ``--batch-size`` is per process; the lr is scaled by
the global batch. See docs/training.md.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.contrib.logging import logging_redirect_tqdm

from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_write_text
from simclr_embed.training import budget
from simclr_embed.training import distributed as dist
from simclr_embed.training.augment import SimCLRAugment
from simclr_embed.training.checkpoint import capture_rng_state, save_checkpoint
from simclr_embed.training.config import TrainConfig
from simclr_embed.training.data import build_train_loader, find_images
from simclr_embed.training.device_augment import (
    DeviceAppearance,
    resolve_augment_on,
    step_generator,
)
from simclr_embed.training.gradcache import cached_backward
from simclr_embed.training.loss import nt_xent_loss_and_accuracy
from simclr_embed.training.optim import build_optimizer, scaled_lr, warmup_cosine
from simclr_embed.training.preemption import StopRequest
from simclr_embed.training.reporting import Reporter
from simclr_embed.training.resume import agree, load_resume_state, prepare_out_dir
from simclr_embed.training.setup import build_model, resolve_precision, resolve_run, seed_everything

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """Where the run is. ``batch_in_epoch`` batches of ``epoch`` are consumed (resume skips them)."""

    step: int
    epoch: int
    batch_in_epoch: int
    steps_per_epoch: int
    total_steps: int
    stop_step: int  # min(total_steps, --stop-after-steps)
    stopped_by: str | None = None  # the signal that stopped the run (any rank's)

    def position(self) -> tuple[int, int]:
        """(epoch, batch) to resume at; a finished epoch resumes at the next one's start."""
        if self.batch_in_epoch >= self.steps_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.batch_in_epoch


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    epoch: int,
    cfg: TrainConfig,
    state: RunState,
    reporter: Reporter,
    scaler: torch.amp.GradScaler,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    on_step: Callable[[], None] | None = None,
    stop: StopRequest | None = None,
    appearance: DeviceAppearance | None = None,
) -> None:
    """One pass over ``loader`` (already positioned by the sampler), stopping at
    ``state.stop_step``, or after the step in progress when any rank got a stop signal.

    With ``appearance`` the loader yields uint8 geometry-only crops and the appearance stage
    runs here, on the whole ``[2B, 3, S, S]`` batch on ``device``.
    """
    model.train()
    fetch_started = time.perf_counter()
    for batch in loader:
        reporter.waited(time.perf_counter() - fetch_started)  # host time spent waiting for data
        if state.step >= state.stop_step:
            break
        reporter.skipped(batch["failed"])
        if not batch["ok"]:
            raise SimclrError(
                f"could not read any of many consecutive files in --data {cfg.data}; "
                "are they images?"
            )
        # Both views in one forward, so BatchNorm normalizes over 2B like the paper's TPU code.
        v1 = batch["view1"].to(device, non_blocking=True)  # [B, 3, S, S]
        v2 = batch["view2"].to(device, non_blocking=True)  # [B, 3, S, S]
        x = torch.cat([v1, v2])  # [2B, 3, S, S]: float views, or uint8 crops for `appearance`
        if appearance is not None:  # parameters from (seed, step, rank): exact resume holds
            x = appearance(x, step_generator(cfg.seed, state.step, dist.rank()))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def autocast() -> torch.autocast:
            return torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            )

        def loss_of(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z1, z2 = z.float().chunk(2)  # [B, P] each; the loss gathers all ranks' rows itself
            return nt_xent_loss_and_accuracy(z1, z2, cfg.temperature)

        if cfg.chunk_size is not None:  # the same gradient, one chunk's activations at a time
            loss, top1 = cached_backward(
                model, x, cfg.chunk_size, loss_of, autocast=autocast, scale=scaler.scale
            )
        else:
            with autocast():
                _, z = model(x)  # [2B, P]
            loss, top1 = loss_of(z)
            scaler.scale(loss).backward()
        # nanoGPT's order; with fp32/bf16 the scaler is disabled and these are plain calls.
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()  # per optimizer step
        state.step += 1
        state.batch_in_epoch += 1
        reporter.step(state.step, loss, top1, scheduler.get_last_lr()[0])
        if on_step is not None:
            on_step()
        if stop is not None and stop.agreed():  # every rank, every step: the same answer
            state.stopped_by = stop.signal_name or "a signal to another rank"
            break
        fetch_started = time.perf_counter()


def main(cfg: TrainConfig) -> int:
    stop = StopRequest().install()  # from the first moment: a signal during set-up counts too
    device = dist.init_distributed(cfg.device)
    if not dist.is_primary():
        logging.getLogger().setLevel(logging.ERROR)  # only rank 0 logs
    # With fp16 the GradScaler skips optimizer steps that overflowed; the schedule still advances
    # (it counts iterations), which is what this warning complains about.
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
    try:
        with logging_redirect_tqdm():
            _run(cfg, device, stop)
    finally:
        dist.cleanup()
        stop.restore()
    return 0


def _run(cfg: TrainConfig, device: torch.device, stop: StopRequest) -> None:
    world, rank, cuda = dist.world_size(), dist.rank(), device.type == "cuda"
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    paths = find_images(cfg.data)  # before OUT is made: a typo in --data leaves nothing behind
    resuming = bool(dist.broadcast_object(agree(lambda: prepare_out_dir(out, cfg.resume))))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp_dtype, use_scaler = resolve_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    augment_on = resolve_augment_on(cfg.augment_on, device)
    augment = SimCLRAugment(
        cfg.image_size,
        cfg.color_strength,
        cfg.blur,
        cfg.mean,
        cfg.std,
        appearance_on_cpu=augment_on == "workers",
        grayscale_prob=cfg.grayscale_prob,
    )
    appearance = None
    if augment_on == "device":
        appearance = DeviceAppearance(
            cfg.image_size, cfg.color_strength, cfg.blur, cfg.mean, cfg.std, cfg.grayscale_prob
        )
    sampler, loader = build_train_loader(
        paths,
        augment,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        seed=cfg.seed,
        world_size=world,
        rank=rank,
        pin_memory=cuda,
    )
    steps_per_epoch, global_batch = len(loader), cfg.batch_size * world
    if steps_per_epoch == 0:
        raise SimclrError(
            f"--data {cfg.data} has {len(paths)} images, fewer than one global "
            f"batch ({cfg.batch_size} × {world} processes); lower --batch-size"
        )
    peak_lr = scaled_lr(cfg.lr, global_batch, cfg.lr_scaling)
    raw_model = build_model(cfg, device, world, resuming)  # checkpoints/kNN use it: no wrappers
    optimizer = build_optimizer(cfg.optimizer, raw_model, peak_lr, cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    model = raw_model
    if world > 1:
        model = DDP(model, device_ids=[device.index] if cuda else None)
    if cfg.compile:
        model = torch.compile(model)  # after DDP, so DDP's bucketing can split the graph
    plan = None
    if cfg.time_budget_s is not None:  # the run's length from its own measured step rate
        step_args = dict(model=model, optimizer=optimizer, scaler=scaler, loader=loader,
                         sampler=sampler, device=device, amp_dtype=amp_dtype,
                         channels_last=cuda, stop=stop, appearance=appearance)  # fmt: skip
        if resuming:  # an interrupted run's plan: not measured again, so the resume is exact
            plan = budget.recorded_plan(ckpt_dir / "last.pt")
        else:  # calibration steps from a state of their own, rolled back afterwards
            fresh = RunState(0, 0, 0, steps_per_epoch, 1 << 62, 1 << 62)
            plan = budget.calibrate_run(cfg, raw_model, fresh, train_one_epoch, global_batch, step_args)  # fmt: skip
        if plan is None:
            logger.warning("stopped by %s while measuring the step rate; nothing to save", stop.signal_name)  # fmt: skip
            return
    resolved = resolve_run(
        cfg,
        num_images=len(paths),
        steps_per_epoch=steps_per_epoch,
        world=world,
        device=device,
        amp_dtype=amp_dtype,
        total_steps=plan["total_steps"] if plan else None,
        warmup_steps=plan["warmup_steps"] if plan else None,
    )
    resolved["augment_on"] = augment_on
    if plan is not None:
        resolved["time_budget"] = plan
    total_steps = resolved["total_steps"]
    scheduler = warmup_cosine(optimizer, resolved["warmup_steps"], total_steps)
    stop_step = min(total_steps, cfg.stop_after_steps or total_steps)
    state = RunState(0, 0, 0, steps_per_epoch, total_steps, stop_step)
    if resuming:
        state.step, state.epoch, state.batch_in_epoch = load_resume_state(
            ckpt_dir / "last.pt", resolved, raw_model, optimizer, scheduler, scaler
        )
        if state.step >= total_steps:
            logger.info(
                "%s already finished: step %d of %d; nothing to do", out, state.step, total_steps
            )
            return

    eval_sets = None
    if cfg.eval_data:  # read on rank 0; a bad folder stops every rank with the same message
        from simclr_embed.training.monitor import load_eval_sets

        eval_sets = agree(lambda: load_eval_sets(cfg.eval_data, cfg.image_size))
    if dist.is_primary():
        atomic_write_text(
            out / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n"
        )
        logger.info(
            "training %s (%s stem) on %d images: %d process(es) × batch %d, %d steps "
            "(%d/epoch), peak lr %.4g, %s on %s, appearance augmentation in the %s",
            cfg.arch,
            cfg.stem,
            len(paths),
            world,
            cfg.batch_size,
            total_steps,
            steps_per_epoch,
            peak_lr,
            resolved["amp_dtype"],
            device,
            "DataLoader workers" if augment_on == "workers" else f"main process on {device}",
        )
    reporter = Reporter(
        out,
        total_steps=total_steps,
        start_step=state.step,
        global_batch=global_batch,
        log_every=cfg.log_every,
        progress=cfg.progress,
        loggers=cfg.logger,
        params=resolved,
        experiment=cfg.mlflow_experiment,
    )

    def checkpoint() -> None:
        if dist.is_primary():
            epoch, batch = state.position()
            payload: dict[str, Any] = {
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else None,
                "step": state.step,
                "epoch": epoch,
                "batch_in_epoch": batch,
                "rng": capture_rng_state(),
                "sampler": {
                    "seed": cfg.seed,
                    "epoch": epoch,
                    "start_batch": batch,
                    "world_size": world,
                    "batch_size": cfg.batch_size,
                },
                "config": resolved,
            }
            path = save_checkpoint(ckpt_dir, payload, cfg.keep_checkpoints)
            logger.info("wrote %s (step %d)", path, state.step)
        nonlocal last_saved
        last_saved = state.step

    def knn() -> None:
        nonlocal last_eval
        if eval_sets is not None:  # rank 0 only; the others wait at the barrier
            from simclr_embed.training.monitor import knn_monitor

            top1 = knn_monitor(
                raw_model,
                *eval_sets,
                device,
                cfg.mean,
                cfg.std,
                batch_size=max(cfg.batch_size, 64),
                workers=min(cfg.workers, 4),
                amp_dtype=amp_dtype,
                channels_last=cuda,
            )
            reporter.knn(state.step, state.position()[0], top1)
        dist.barrier()
        last_eval = state.step

    def on_step() -> None:
        if state.step % cfg.checkpoint_every == 0:
            checkpoint()

    last_saved, last_eval = state.step, -1
    try:
        while state.step < state.stop_step and state.stopped_by is None:
            sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
            train_one_epoch(
                model,
                optimizer,
                scheduler,
                loader,
                device,
                state.epoch,
                cfg,
                state,
                reporter,
                scaler,
                amp_dtype=amp_dtype,
                channels_last=cuda,
                on_step=on_step,
                stop=stop,
                appearance=appearance,
            )
            if state.batch_in_epoch >= steps_per_epoch:  # the epoch is complete
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                reporter.epoch_end(state.epoch)
                if state.epoch % cfg.eval_every == 0 and state.stopped_by is None:
                    knn()
        # The checkpoint before any output: a failing terminal must never cost it.
        if state.step != last_saved or not (ckpt_dir / "last.pt").exists():
            checkpoint()
        reporter.flush(state.step, scheduler.get_last_lr()[0])
        dist.barrier()  # nobody exits before rank 0's last.pt is on disk
        if cfg.eval_data and last_eval != state.step and state.stopped_by is None:
            knn()
    finally:
        reporter.close(ckpt_dir / "last.pt", finished=state.step >= total_steps)
    if state.stopped_by is not None:
        logger.warning(
            "stopped by %s at step %d of %d; last.pt is written. Continue with the same command "
            "and --resume auto (or --resume)",
            state.stopped_by,
            state.step,
            total_steps,
        )
    elif state.step < total_steps:
        logger.info(
            "stopped at step %d of %d (--stop-after-steps); continue with --resume",
            state.step,
            total_steps,
        )
    else:
        logger.info("done: %d steps; checkpoints in %s", state.step, ckpt_dir)
