"""``--time-budget``: train for a time, not a step count.

A user knows how long they can wait, not their CPU's arithmetic (the same recipe trains at 118
img/s on a CPU with native bf16 and at 40 on an AVX2-only one). The run's length is fixed once,
from its own measured step rate, before the first real step:

1. calibration: ``settle`` steps (start-up, allocations, DataLoader workers, ``--compile``; at
   least 2 and at least 1 % of the budget: the first seconds run slower than the rest) and then
   at least ``min_steps`` timed steps (and at least ~1.5 % of the budget), with the learning rate
   at zero; the model, optimizer, scaler and RNG are then restored, so the calibration leaves no
   trace in the weights — a budget run is bit-identical to ``--max-steps N`` with its plan's N;
2. under torchrun every rank measures and they agree on the slowest rank's rate;
3. ``total_steps = (budget − calibration time) × rate × (1 − margin)``; warm-up and cosine are laid
   over it as for ``--max-steps``.

The plan (budget, measured rate, steps, warm-up) goes into ``OUT/config.json`` and every
checkpoint; ``--resume`` and a preempted run reuse it instead of measuring again, so they stay
exact. Not in the plan: the kNN monitor's evaluations (``--eval-data``), which add their own time.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from simclr_embed.errors import SimclrError
from simclr_embed.training import distributed as dist
from simclr_embed.training.checkpoint import capture_rng_state, restore_rng_state

logger = logging.getLogger(__name__)

SETTLE_STEPS = 2  # not timed: first-iteration allocations, worker start-up, compilation
SETTLE_FRACTION = 0.01  # and not before 1 % of the budget: the first seconds run slower (measured)
MIN_STEPS = 3  # timed steps at least
MAX_STEPS = 50  # timed steps at most
MIN_FRACTION = 0.015  # and at least this share of the budget, for a steadier rate
MIN_SECONDS, MIN_SECONDS_FRACTION = 2.0, 0.05  # and ~2 s where that stays under 5 % of it
MARGIN = 0.01  # checkpoint writes and the last log lines

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([hms]?)", re.IGNORECASE)
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}


def parse_duration(text: str) -> float:
    """``"45m"``, ``"2h"``, ``"90s"``, ``"1h30m"``, ``"1.5h"`` or plain seconds → seconds (> 0)."""
    s = str(text).strip().lower().replace(" ", "")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None or (m.group(2) == "" and (pos != 0 or m.end() != len(s))):
            raise ValueError(f"expected a duration like 45m, 2h, 90s or 1h30m, got {text!r}")
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not s or not total > 0:
        raise ValueError(f"expected a positive duration like 45m, 2h or 90s, got {text!r}")
    return total


def format_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def timed_steps(budget_s: float, first_step_s: float) -> int:
    """How many steps to time, given how long the first settle step took."""
    seconds = max(MIN_FRACTION * budget_s, min(MIN_SECONDS, MIN_SECONDS_FRACTION * budget_s))
    want = math.ceil(seconds / max(first_step_s, 1e-6))
    return max(MIN_STEPS, min(MAX_STEPS, want))


def plan(
    budget_s: float,
    calibration_s: float,
    steps_per_s: float,
    global_batch: int,
    warmup_fraction: float,
) -> dict[str, Any]:
    """The run's length from the measured rate; what goes into config.json and checkpoints."""
    left = budget_s - calibration_s
    total = max(1, math.floor(left * steps_per_s * (1 - MARGIN)))
    return {
        "budget_s": budget_s,
        "calibration_s": round(calibration_s, 3),
        "steps_per_s": steps_per_s,
        "images_per_s": steps_per_s * global_batch,
        "total_steps": total,
        "warmup_steps": min(total, round(total * warmup_fraction)),
    }


def describe(p: dict[str, Any]) -> str:
    """``time budget 30 min → 412 steps at 58 img/s (measured), warm-up 21``."""
    return (
        f"time budget {format_duration(p['budget_s'])} → {p['total_steps']} steps at "
        f"{p['images_per_s']:.0f} img/s (measured), warm-up {p['warmup_steps']}"
    )


def measure(
    run: Callable[[Callable[[], bool]], None],
    budget_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float]:
    """``(steps_per_s, seconds spent)``. ``run(tick)`` runs steps one after another, calling
    ``tick()`` after each, until it returns False (or a stop signal ends it). One continuous run:
    a pause between the settle and the timed steps (a new DataLoader iterator) would be timed."""
    marks: list[float] = []
    started = clock()
    target: list[int] = []  # [settle steps, all steps], once the settling is over

    def tick() -> bool:
        marks.append(clock())
        settled = len(marks) >= SETTLE_STEPS and marks[-1] - started >= SETTLE_FRACTION * budget_s
        if settled and not target:
            last = marks[-1] - (marks[-2] if len(marks) > 1 else started)
            target.extend([len(marks), len(marks) + timed_steps(budget_s, last)])
        return not target or len(marks) < target[1]

    run(tick)
    settle = target[0] if target else SETTLE_STEPS
    timed = marks[settle - 1 :]  # from the end of the settle steps
    n = len(timed) - 1
    rate = n / max(timed[-1] - timed[0], 1e-9) if n > 0 else 0.0
    return rate, clock() - started


class Quiet:
    """The reporter during calibration: those steps are not the run's."""

    def waited(self, seconds: float) -> None: ...

    def skipped(self, n: Any) -> None: ...

    def step(self, *args: Any) -> None: ...


def recorded_plan(last: Path) -> dict[str, Any]:
    """The plan an interrupted budget run recorded in its checkpoint (read on rank 0, sent to all)."""

    def read() -> Any:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        return ckpt["config"].get("time_budget")

    plan = dist.broadcast_object(read() if dist.is_primary() else None)
    if plan is None:
        raise SimclrError(
            f"--time-budget: {last} was not planned by a time budget; resume it with its own "
            "--max-steps/--epochs"
        )
    logger.info("%s (the interrupted run's plan)", describe(plan))
    return plan


def calibrate_run(
    cfg: Any,
    raw_model: torch.nn.Module,
    state: Any,
    train_one_epoch: Callable[..., None],
    global_batch: int,
    step_args: dict[str, Any],
) -> dict[str, Any] | None:
    """Calibrate on the run's own step (``train.train_one_epoch`` over its loader, from
    ``state``, a fresh ``train.RunState``) with the learning rate at zero."""
    sampler, loader, device = (step_args.pop(k) for k in ("sampler", "loader", "device"))
    model, optimizer, scaler = (step_args.pop(k) for k in ("model", "optimizer", "scaler"))
    zero_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 0.0)

    def run(tick: Callable[[], bool]) -> bool:
        def on_step() -> None:
            # Every rank runs the same calibration steps: go on while any rank wants to (each
            # rank's own timing would otherwise stop them at different steps, deadlocking DDP).
            if not dist.any_rank(tick()):
                state.stop_step = state.step

        while state.step < state.stop_step and state.stopped_by is None:
            sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
            train_one_epoch(model, optimizer, zero_lr, loader, device, state.epoch, cfg, state,
                            Quiet(), scaler, on_step=on_step, **step_args)  # fmt: skip
            if state.batch_in_epoch >= state.steps_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        return state.stopped_by is None

    return calibrate(
        run, cfg, raw_model=raw_model, optimizer=optimizer, scaler=scaler,
        global_batch=global_batch,
    )  # fmt: skip


def calibrate(
    run: Callable[[Callable[[], bool]], bool],
    cfg: Any,
    *,
    raw_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    global_batch: int,
) -> dict[str, Any] | None:
    """Measure on real steps (``run(tick)`` → False when a signal stopped it), roll them back,
    agree across ranks, plan. None when stopped."""
    snapshot = (
        copy.deepcopy(raw_model.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
        scaler.state_dict(),
        capture_rng_state(),
    )
    finished: list[bool] = []
    budget_s = float(cfg.time_budget_s or 0)
    rate, spent = measure(lambda tick: finished.append(run(tick)), budget_s)
    raw_model.load_state_dict(snapshot[0])  # the calibration leaves no trace in the run
    optimizer.load_state_dict(snapshot[1])
    if scaler.is_enabled():
        scaler.load_state_dict(snapshot[2])
    restore_rng_state(snapshot[3])
    if not all(finished):
        return None
    rate = dist.min_over_ranks(rate)  # every rank: the slowest rank's rate, the same plan
    spent = -dist.min_over_ranks(-spent)
    p = plan(budget_s, spent, rate, global_batch, min(1.0, cfg.warmup_epochs / cfg.epochs))
    if cfg.warmup_steps is not None:
        p["warmup_steps"] = min(p["total_steps"], cfg.warmup_steps)
    logger.info("%s", describe(p))
    return p
