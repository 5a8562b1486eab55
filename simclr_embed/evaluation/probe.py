"""Linear probe: multinomial logistic regression on frozen, standardized features.

The standard linear-evaluation protocol (SimCLR's transfer experiments fit an L2-regularized
multinomial logistic regression with L-BFGS): features are standardized with the *training*
mean/std, then one linear layer is fit full-batch with L-BFGS (strong-Wolfe line search) on
cross-entropy + L2. Nothing flows back into the backbone: the inputs are plain tensors.

The L2 strength matters (on CIFAR raw pixels, 1e-3 → 33% and 1e-1 → 38% top-1), so by default it
is chosen from a small grid on a held-out fifth of the *training* set (the scored set is never
looked at), then the probe is refit on all training features with the chosen value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

log = logging.getLogger(__name__)

# Descending, so each fit warm-starts from the more strongly regularized (faster) solution.
DEFAULT_L2_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
HOLDOUT_EVERY = 5  # every 5th training sample of each class is held out for choosing l2


@dataclass(frozen=True)
class ProbeResult:
    top1: float  # on the query (validation) set, in [0, 1]
    train_top1: float  # on the training set: how well the classes are linearly separable
    train_loss: float  # final objective (cross-entropy + L2)
    iterations: int  # L-BFGS iterations of the final fit
    l2: float  # the L2 strength used for the final fit
    l2_scores: dict[float, float] = field(default_factory=dict)  # held-out top-1 per grid value


def standardize(train: Tensor, *others: Tensor, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """Scale every feature to zero mean and unit variance using the training set's statistics."""
    mean = train.mean(dim=0, keepdim=True)  # [1, D]
    std = train.std(dim=0, keepdim=True).clamp_min(eps)  # [1, D]; constant features stay 0
    return tuple((x - mean) / std for x in (train, *others))


def fit_linear(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    iterations: int = 300,
    l2: float = 1e-3,
    init: torch.nn.Linear | None = None,
    on_eval: Callable[[], object] | None = None,
) -> tuple[torch.nn.Linear, float, int]:
    """Fit ``Linear(D, K)`` to ``x`` ``[N, D]``, ``y`` ``[N]`` by full-batch L-BFGS.

    Objective: ``mean CE + l2/2 · ||W||²`` (bias not penalized); strictly convex for l2 > 0, so the
    start only changes the speed: zeros, or ``init``'s weights (warm start). Deterministic.
    Returns the layer, the final objective and the iterations run.
    """
    layer = torch.nn.Linear(x.shape[1], num_classes, device=x.device)
    with torch.no_grad():
        layer.weight.copy_(init.weight if init is not None else torch.zeros_like(layer.weight))
        layer.bias.copy_(init.bias if init is not None else torch.zeros_like(layer.bias))
    opt = torch.optim.LBFGS(
        layer.parameters(),
        lr=1.0,
        max_iter=iterations,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(layer(x), y) + 0.5 * l2 * layer.weight.square().sum()
        loss.backward()
        if on_eval is not None:
            on_eval()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        final = closure().item()
    return layer, final, int(opt.state[layer.weight].get("n_iter", 0))


@torch.no_grad()
def _accuracy(layer: torch.nn.Linear, x: Tensor, y: Tensor) -> float:
    return (layer(x).argmax(dim=1) == y).float().mean().item()


def holdout_split(labels: Tensor, every: int = HOLDOUT_EVERY) -> tuple[Tensor, Tensor]:
    """Deterministic stratified split: every ``every``-th sample of each class is held out."""
    rank = torch.zeros_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(idx.numel(), device=labels.device)
    held = rank % every == every - 1
    return (~held).nonzero().squeeze(1), held.nonzero().squeeze(1)


def select_l2(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    grid: Sequence[float],
    iterations: int,
    on_eval: Callable[[], object] | None = None,
) -> tuple[float, dict[float, float], torch.nn.Linear | None]:
    """The grid value with the best held-out top-1 (ties → the stronger penalty), all scores, and
    the layer fit with it (a warm start for the final fit)."""
    fit_idx, held_idx = holdout_split(y)
    if held_idx.numel() == 0 or len(grid) == 1:
        return float(grid[0]), {}, None
    scores: dict[float, float] = {}
    layers: dict[float, torch.nn.Linear] = {}
    layer = None
    for l2 in sorted(grid, reverse=True):
        layer, _, _ = fit_linear(
            x[fit_idx], y[fit_idx], num_classes, iterations, l2, init=layer, on_eval=on_eval
        )
        scores[float(l2)], layers[float(l2)] = _accuracy(layer, x[held_idx], y[held_idx]), layer
    best = max(scores, key=lambda v: (scores[v], v))
    return best, scores, layers[best]


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    query_feats: Tensor,
    query_labels: Tensor,
    num_classes: int,
    iterations: int = 300,
    l2: float | None = None,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    progress: str | None = None,
) -> ProbeResult:
    """Standardize, fit on train (``l2=None``: choose it on a held-out part of train), score query.

    Runs on ``train_feats.device``.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if l2 is not None and l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    device = train_feats.device
    xtr, xq = standardize(train_feats.detach().float(), query_feats.detach().to(device).float())
    ytr = train_labels.to(device).long()
    yq = query_labels.to(device).long()
    scores: dict[float, float] = {}
    init = None
    # L-BFGS evaluations: up to ~`iterations` per fit, one fit per grid value and the final one.
    fits = 1 + (len(grid) if l2 is None else 0)
    bar = tqdm(total=fits * iterations, desc=progress, unit="eval", disable=True if progress is None else None, leave=False)  # fmt: skip
    if l2 is None:
        l2, scores, init = select_l2(xtr, ytr, num_classes, grid, iterations, on_eval=bar.update)
        log.info(
            "linear probe: l2 %g chosen on a held-out part of train (%s)",
            l2,
            ", ".join(f"{k:g}: {v:.4f}" for k, v in scores.items()),
        )
    layer, loss, n_iter = fit_linear(
        xtr, ytr, num_classes, iterations, l2, init=init, on_eval=bar.update
    )
    bar.close()
    result = ProbeResult(
        top1=_accuracy(layer, xq, yq),
        train_top1=_accuracy(layer, xtr, ytr),
        train_loss=loss,
        iterations=n_iter,
        l2=l2,
        l2_scores=scores,
    )
    log.info(
        "linear probe: %d L-BFGS iterations, loss %.4f, train top-1 %.4f, val top-1 %.4f",
        n_iter,
        loss,
        result.train_top1,
        result.top1,
    )
    return result
