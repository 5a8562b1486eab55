"""Progress, logs and TensorBoard for the training loop; bad-file bookkeeping.

Every rank calls the same methods at the same steps (the meters are averaged over ranks with one
all-reduce per log point, the only host sync in the loop); only rank 0 draws the tqdm bar,
writes log lines and TensorBoard events (``OUT/tb``: train/loss, train/lr, train/img_per_s,
train/contrastive_top1, perf/data_wait, eval/knn_top1).

``perf/data_wait`` is the fraction of each logging window the training loop spent waiting for
its next batch: near 0 the step is the limit; high means the run is input-bound (more
``--workers``, ``--augment-on device``, faster storage: docs/training.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from simclr_embed.training import distributed as dist

logger = logging.getLogger(__name__)


class Reporter:
    def __init__(
        self,
        out_dir: Path,
        *,
        total_steps: int,
        start_step: int,
        global_batch: int,
        log_every: int,
        progress: bool,
        loggers: str = "tensorboard",
        params: dict[str, Any] | None = None,
        experiment: str | None = None,
    ) -> None:
        self.primary = dist.is_primary()
        self.total_steps, self.global_batch, self.log_every = total_steps, global_batch, log_every
        self.writer = None
        self.tracker: Any = None  # rank 0's MlflowRun (training/tracking.py)
        if self.primary and "mlflow" in loggers.split(","):
            from simclr_embed.training.tracking import MlflowRun

            self.tracker = MlflowRun(out_dir, params or {}, experiment)
        if self.primary and "tensorboard" in loggers.split(","):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"))
        self.pbar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.primary and progress),
            desc="train",
        )
        self.bad_files: set[str] = set()  # unreadable files seen by this rank
        self.last: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        self._loss: torch.Tensor | None = None
        self._top1: torch.Tensor | None = None
        self._n = 0
        self._wait = 0.0  # seconds waiting for batches in this window
        self._t0 = time.perf_counter()

    def skipped(self, failed: list[str]) -> None:
        """Warn once per unreadable file (they travel back from the workers with each batch)."""
        for f in failed:
            if f not in self.bad_files:
                self.bad_files.add(f)
                logger.warning("skipping unreadable image %s", f)

    def waited(self, seconds: float) -> None:
        """Time the loop just spent waiting for the next batch."""
        self._wait += seconds

    def step(self, step: int, loss: torch.Tensor, top1: torch.Tensor, lr: float) -> None:
        """Record one optimizer step; every ``log_every`` steps (and the last) log the means."""
        # Accumulate on the device: no .item() here, so the GPU never waits for the host.
        loss, top1 = loss.detach().float(), top1.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss
        self._top1 = top1 if self._top1 is None else self._top1 + top1
        self._n += 1
        self.pbar.update(1)
        if step % self.log_every == 0 or step == self.total_steps:
            self.flush(step, lr)

    def flush(self, step: int, lr: float) -> None:
        if self._n == 0 or self._loss is None or self._top1 is None:
            return
        means = dist.all_reduce_mean(torch.stack([self._loss, self._top1]) / self._n)  # [2]
        loss, top1 = means.tolist()  # syncs: the elapsed time below is real
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        img_s = self._n * self.global_batch / elapsed
        wait = min(1.0, self._wait / elapsed)
        self.last = {"loss": loss, "top1": top1, "lr": lr, "img_per_s": img_s, "data_wait": wait}
        self.pbar.set_postfix(
            loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{img_s:.0f}", wait=f"{wait:.0%}"
        )
        logger.info(
            "step %d/%d  loss %.4f  contrastive top-1 %.3f  lr %.4g  %.0f img/s  data wait %.0f%%",
            step,
            self.total_steps,
            loss,
            top1,
            lr,
            img_s,
            100 * wait,
        )
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/contrastive_top1", top1, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/img_per_s", img_s, step)
            self.writer.add_scalar("perf/data_wait", wait, step)
        if self.tracker is not None:
            self.tracker.scalars(
                {"train/loss": loss, "train/contrastive_top1": top1, "train/lr": lr,
                 "train/img_per_s": img_s, "perf/data_wait": wait},
                step,
            )  # fmt: skip
        self._reset()

    def epoch_end(self, epoch: int) -> int:
        """Collect every rank's unreadable files on rank 0; log the run's total so far."""
        if dist.world_size() > 1:
            everyone: set[str] = set()
            for src in range(dist.world_size()):  # a few small objects once per epoch
                mine = sorted(self.bad_files) if dist.rank() == src else None
                everyone.update(dist.broadcast_object(mine, src))
            for f in sorted(everyone - self.bad_files):
                logger.warning("skipping unreadable image %s (seen by another rank)", f)
            self.bad_files |= everyone
        if self.bad_files:
            logger.warning(
                "epoch %d: %d unreadable image file(s) skipped so far in this run",
                epoch,
                len(self.bad_files),
            )
        return len(self.bad_files)

    def knn(self, step: int, epoch: int, top1: float) -> None:
        logger.info("epoch %d step %d: kNN top-1 %.4f", epoch, step, top1)
        if self.writer is not None:
            self.writer.add_scalar("eval/knn_top1", top1, step)
            self.writer.flush()
        if self.tracker is not None:
            self.tracker.scalars({"eval/knn_top1": top1}, step)

    def close(self, checkpoint: Path | None = None, finished: bool = True) -> None:
        """A finished run logs ``checkpoint`` to MLflow; an unfinished one (a signal,
        ``--stop-after-steps``, a crash) ends its MLflow run KILLED, to be resumed into."""
        self.pbar.close()
        if self.writer is not None:
            self.writer.close()
        if self.tracker is not None:
            self.tracker.finish(checkpoint if finished else None, stopped=not finished)
