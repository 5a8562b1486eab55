"""Optimizers and the learning-rate schedule of SimCLR training.

- :class:`LARS`: SGD with momentum whose step per layer is scaled by a trust ratio
  η·‖w‖ / (‖g‖ + wd·‖w‖) (You et al. 2017, as used by SimCLR).
- :func:`param_groups`: biases and every normalization parameter go to a group with no weight
  decay and no trust-ratio adaptation — chosen by module type and parameter ndim, never by name.
- :func:`scaled_lr`: the base lr is "per 256 images"; linear or square-root scaling.
- :func:`warmup_cosine`: linear warmup then cosine decay to 0, stepped once per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

# Every module type whose parameters are affine normalization parameters (BatchNorm1d/2d/3d,
# SyncBatchNorm and InstanceNorm derive from _NormBase).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling on top of heavy-ball SGD.

    For each parameter w with gradient g in a group with ``lars_exclude=False``::

        trust = η·‖w‖ / (‖g‖ + wd·‖w‖)      (1 when ‖w‖ = 0 or the denominator is 0)
        d     = trust · (g + wd·w)
    and for ``lars_exclude=True`` (biases, norm parameters) simply ``d = g``. Then::

        buf = momentum·buf + d ;  w = w − lr·buf

    Everything stays on the device (no ``.item()``), so a step never syncs the GPU.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        lars_exclude: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "lars_exclude": lars_exclude,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta = group["weight_decay"], group["trust_coefficient"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                if group["lars_exclude"]:
                    d = g  # plain momentum SGD: no weight decay, no adaptation
                else:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    denom = g_norm + wd * w_norm
                    trust = torch.where(
                        (w_norm > 0) & (denom > 0), eta * w_norm / denom, torch.ones_like(w_norm)
                    )
                    d = g.add(p, alpha=wd).mul_(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()  # first step: buf = d
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into ``[decayed, excluded]`` optimizer groups.

    Excluded (no weight decay, no LARS adaptation): every parameter of a normalization module
    (:data:`NORM_TYPES`, weights and biases) and every other parameter with ``ndim <= 1``
    (biases). Decayed: the rest (conv / linear weights). Empty groups are left out; frozen
    parameters (``requires_grad=False``) are skipped; shared parameters appear once.
    """
    decay: list[nn.Parameter] = []
    exclude: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_TYPES)
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (exclude if is_norm or p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": exclude, "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]


def scaled_lr(base_lr: float, global_batch: int, scaling: str = "linear") -> float:
    """The learning rate for a global batch, from a base lr meaning "per 256 images".

    ``linear``: base · B / 256 (SimCLR with LARS: base 0.3).
    ``sqrt``: base · √(B / 256), so the base keeps its "at 256 images" meaning. The paper's
    square-root rule, 0.075 · √B, is this with base = 0.075 · 16 = 1.2.
    """
    if global_batch < 1:
        raise ValueError(f"global batch must be >= 1, got {global_batch}")
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise ValueError(f"base lr must be a finite number > 0, got {base_lr}")
    if scaling == "linear":
        return base_lr * global_batch / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch / 256)
    raise ValueError(f"lr scaling must be 'linear' or 'sqrt', got {scaling!r}")


OPTIMIZERS = ("lars", "sgd", "adamw")


def build_optimizer(
    name: str, model: nn.Module, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """``lars`` | ``sgd`` (momentum 0.9) | ``adamw``, all over :func:`param_groups`.

    For sgd and adamw the ``lars_exclude`` flag only means "no weight decay" (its group carries
    weight_decay 0); LARS also skips the trust ratio there.
    """
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=0.9, trust_coefficient=1e-3)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=False)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to 0, as a multiplier of each group's lr.

    Step s (the s-th optimizer step, from 0) uses factor
    ``(s + 1) / (warmup + 1)`` while ``s < warmup`` (starts near 0, reaches 1 at s = warmup),
    then ``½·(1 + cos(π·(s − warmup) / (total − warmup)))``, 0 from ``s = total`` on.
    Call ``scheduler.step()`` after every ``optimizer.step()``. ``state_dict()`` round-trips
    (it holds ``last_epoch``; the multiplier is rebuilt from the arguments).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    warmup = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if step >= total_steps:
            return 0.0
        progress = (step - warmup) / (total_steps - warmup)  # [0, 1)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
