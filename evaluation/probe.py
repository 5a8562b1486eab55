"""Linear probe: multinomial logistic regression on frozen, standardized features.

The standard linear-evaluation protocol (SimCLR's transfer experiments fit an L2-regularized
multinomial logistic regression with L-BFGS): features are standardized with the *training* mean/std, then a single linear
layer is fit full-batch with L-BFGS (strong-Wolfe line search) on cross-entropy + L2. Nothing
flows back into the backbone: the inputs are plain tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    top1: float  # on the query (validation) set, in [0, 1]
    train_top1: float  # on the training set: how well the classes are linearly separable
    train_loss: float  # final objective (cross-entropy + L2)
    iterations: int  # L-BFGS iterations actually run


def standardize(train: Tensor, *others: Tensor, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """Scale every feature to zero mean and unit variance using the training set's statistics."""
    mean = train.mean(dim=0, keepdim=True)  # [1, D]
    std = train.std(dim=0, keepdim=True).clamp_min(eps)  # [1, D]; constant features stay 0
    return tuple((x - mean) / std for x in (train, *others))


def fit_linear(
    x: Tensor, y: Tensor, num_classes: int, iterations: int = 300, l2: float = 1e-3
) -> tuple[torch.nn.Linear, float, int]:
    """Fit ``Linear(D, K)`` to ``x`` ``[N, D]``, ``y`` ``[N]`` by full-batch L-BFGS.

    Objective: ``mean CE + l2/2 · ||W||²`` (bias not penalized). Deterministic given the data.
    Returns the layer, the final objective and the iterations run.
    """
    layer = torch.nn.Linear(x.shape[1], num_classes, device=x.device)
    torch.nn.init.zeros_(layer.weight)  # convex problem: start at 0 for a reproducible result
    torch.nn.init.zeros_(layer.bias)
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
        return loss

    with torch.enable_grad():
        opt.step(closure)
        final = closure().item()
    return layer, final, int(opt.state[layer.weight].get("n_iter", 0))


@torch.no_grad()
def _accuracy(layer: torch.nn.Linear, x: Tensor, y: Tensor) -> float:
    return (layer(x).argmax(dim=1) == y).float().mean().item()


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    query_feats: Tensor,
    query_labels: Tensor,
    num_classes: int,
    iterations: int = 300,
    l2: float = 1e-3,
) -> ProbeResult:
    """Standardize, fit on train, score top-1 on query. Runs on ``train_feats.device``."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    device = train_feats.device
    xtr, xq = standardize(train_feats.float(), query_feats.to(device).float())
    ytr = train_labels.to(device).long()
    yq = query_labels.to(device).long()
    layer, loss, n_iter = fit_linear(xtr.detach(), ytr, num_classes, iterations, l2)
    result = ProbeResult(
        top1=_accuracy(layer, xq, yq),
        train_top1=_accuracy(layer, xtr, ytr),
        train_loss=loss,
        iterations=n_iter,
    )
    log.info(
        "linear probe: %d L-BFGS iterations, loss %.4f, train top-1 %.4f, val top-1 %.4f",
        n_iter,
        loss,
        result.train_top1,
        result.top1,
    )
    return result
