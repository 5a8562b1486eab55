"""Weighted k-nearest-neighbour classification of frozen features (InstDisc / SimCLR protocol).

Each query takes its ``k`` most cosine-similar training features; neighbour ``j`` votes for its
label with weight ``exp(sim_j / T)`` (Wu et al. 2018, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination", eq. 9; T = 0.07). The predicted class is the one with
the largest summed weight. One implementation serves ``simclr evaluate`` and the training-time
``--eval-data`` monitor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Queries per similarity block: bounds the [chunk, N_train] similarity matrix (4096 × 50k fp32
# ≈ 800 MB would be too much; 1024 × 50k ≈ 200 MB is fine on CPU and GPU).
DEFAULT_CHUNK = 1024


def _check(
    train_feats: Tensor,
    train_labels: Tensor,
    query_feats: Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> None:
    if train_feats.ndim != 2 or query_feats.ndim != 2:
        raise ValueError(
            f"features must be [N, D]; got train {tuple(train_feats.shape)}, "
            f"query {tuple(query_feats.shape)}"
        )
    if train_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(
            f"feature dimensions differ: train {train_feats.shape[1]}, query {query_feats.shape[1]}"
        )
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(
            f"train_labels must be [{train_feats.shape[0]}], got {tuple(train_labels.shape)}"
        )
    if train_feats.shape[0] == 0:
        raise ValueError("no training features")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


@torch.no_grad()
def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    query_feats: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Predicted labels ``[Q]`` (int64) for ``query_feats`` ``[Q, D]``.

    Features need not be normalized (cosine similarity is used); ``k`` is clipped to the number
    of training samples. Ties in the vote go to the lowest class index. Computation runs on
    ``train_feats.device`` in float32.
    """
    _check(train_feats, train_labels, query_feats, num_classes, k, temperature)
    device = train_feats.device
    k = min(k, train_feats.shape[0])
    train = F.normalize(train_feats.float(), dim=1)  # [N, D]
    labels = train_labels.to(device=device, dtype=torch.long)  # [N]
    preds = []
    for start in range(0, query_feats.shape[0], chunk_size):
        q = F.normalize(query_feats[start : start + chunk_size].to(device).float(), dim=1)  # [C, D]
        sim = q @ train.T  # [C, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [C, k]
        weights = (top_sim / temperature).exp()  # [C, k]
        top_labels = labels[top_idx]  # [C, k]
        votes = torch.zeros(q.shape[0], num_classes, device=device)  # [C, K]
        votes.scatter_add_(1, top_labels, weights)
        preds.append(votes.argmax(dim=1))
    if not preds:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(preds)


def knn_top1(
    train_feats: Tensor,
    train_labels: Tensor,
    query_feats: Tensor,
    query_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Fraction of ``query_feats`` whose weighted-kNN prediction equals ``query_labels``, in [0, 1]."""
    if query_labels.shape != (query_feats.shape[0],):
        raise ValueError(
            f"query_labels must be [{query_feats.shape[0]}], got {tuple(query_labels.shape)}"
        )
    if query_feats.shape[0] == 0:
        raise ValueError("no query features")
    pred = knn_predict(train_feats, train_labels, query_feats, num_classes, k, temperature)
    return (pred.cpu() == query_labels.cpu().long()).float().mean().item()
