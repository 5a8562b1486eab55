"""NT-Xent (normalized temperature-scaled cross entropy), the SimCLR loss — CONTRACT §5.

For a batch of N images seen as two views, every one of the 2N embeddings is an anchor whose
positive is the other view of the same image and whose negatives are the other 2N−2
embeddings. With W processes the embeddings of all ranks are gathered (with gradient), so each
anchor sees 2·N·W − 2 negatives, exactly as one process holding the whole batch would.

Layout used below (M = N·W rows per view over all ranks, this rank's rows start at o = rank·N):

    candidates = [z1 of rank 0, …, z1 of rank W−1, z2 of rank 0, …, z2 of rank W−1]   # [2M, D]
    anchors    = [z1 of this rank, z2 of this rank]                                   # [2N, D]
    anchor i < N   : self at column o + i,      positive at column M + o + i
    anchor N + i   : self at column M + o + i,  positive at column o + i

The loss is the mean over this rank's 2N anchors; as DDP averages gradients over ranks and every
rank has the same N, that is the gradient of the mean over all 2·N·W anchors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from simclr_embed.training import distributed

# Added to self-similarity logits: exp() underflows to exactly 0 in float32, and unlike -inf it
# never meets a 0 (no -inf·0 = NaN in the gradient or in the softmax).
_MASK_VALUE = -1e9


def _check(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> None:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number, got {temperature!r}") from None
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if z1.ndim != 2 or z2.ndim != 2:
        raise ValueError(
            f"z1 and z2 must be [N, D] embeddings, got shapes {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] == 0:
        raise ValueError("z1 and z2 are empty (N = 0)")


def _logits_and_targets(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked float32 logits ``[2N, 2M]`` of this rank's anchors and their positives ``[2N]``."""
    _check(z1, z2, temperature)
    n = z1.shape[0]
    # float32 whatever the caller's autocast: bf16 cosine similarities / 0.1 lose the small
    # differences the softmax is about.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1 = F.normalize(z1.float(), dim=1)  # [N, D]
        z2 = F.normalize(z2.float(), dim=1)  # [N, D]
        z1_all = distributed.gather_with_grad(z1)  # [M, D]
        z2_all = distributed.gather_with_grad(z2)  # [M, D]
        m = z1_all.shape[0]
        offset = distributed.rank() * n  # 0 when single

        anchors = torch.cat([z1, z2], dim=0)  # [2N, D]
        candidates = torch.cat([z1_all, z2_all], dim=0)  # [2M, D]
        logits = anchors @ candidates.T / float(temperature)  # [2N, 2M]

        idx = torch.arange(n, device=z1.device) + offset  # global row of each local image
        self_col = torch.cat([idx, idx + m])  # [2N]
        positive_col = torch.cat([idx + m, idx])  # [2N]
        # Out-of-place scatter: the masked entries get no gradient.
        logits = logits.scatter(1, self_col[:, None], _MASK_VALUE)
    return logits, positive_col


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean NT-Xent over the 2N anchors of two views' projections.

    Args:
        z1: ``[N, D]`` projections of the first views (not normalized).
        z2: ``[N, D]`` projections of the second views, row i the same image as ``z1[i]``.
        temperature: softmax temperature τ > 0 (SimCLR: 0.1 for large batches, 0.5 for CIFAR).

    Returns:
        Scalar float32 loss. Under ``torch.distributed`` the negatives come from all ranks.

    Raises:
        ValueError: bad temperature or shapes.
    """
    logits, targets = _logits_and_targets(z1, z2, temperature)
    return F.cross_entropy(logits, targets)


def nt_xent_loss_and_accuracy(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, accuracy)``: the loss of :func:`nt_xent_loss` and the contrastive top-1.

    Accuracy is the fraction of this rank's 2N anchors whose most similar candidate among all
    2·N·W − 1 others is their positive (a detached float32 scalar; average it over ranks with
    :func:`simclr_embed.training.distributed.all_reduce_mean` for logging).
    """
    logits, targets = _logits_and_targets(z1, z2, temperature)
    loss = F.cross_entropy(logits, targets)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
    return loss, accuracy
