"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): the gradient of one big contrastive batch in the memory of one chunk.

    pass 1  no grad, chunk by chunk:   x [2B, 3, S, S] → z [2B, P]        (no activations kept)
    loss    on z as a leaf:            NT-Xent over every rank's rows → dL/dz [2B, P]
    pass 2  with grad, chunk by chunk: z_c = f(x_c); z_c.backward(dL/dz_c)  (grads accumulate)

Because the loss is the only place where rows of the batch meet, the parameter gradient is the
same as one backward through the whole batch — exactly so for a network whose rows do not
interact, i.e. without BatchNorm in train mode (tests/training/test_gradcache.py, ≤ 1e-5
relative, 1 and 2 ranks). What needs care:

- **The two passes compute the same function.** No dropout in the model and the augmentation
  done before it, so there is no randomness to replay; autocast is the same in both.
- **BatchNorm normalizes per chunk** (in both passes alike, so the gradient is consistent): like
  per-device BatchNorm with the chunk as the device batch. Chunks are contiguous slices of
  ``cat([view1, view2])`` and the chunk size divides B, so a sample's two views never share a
  chunk's statistics (the way SimCLR's global BN prevents positives from recognising each other
  through shared batch statistics).
- **Running statistics are updated once per step, from the whole batch**: pass 1 leaves them as
  they were; pass 2 records each chunk's mean and variance, puts the buffers back and applies one
  update with the pooled mean and (unbiased) variance of all 2B rows — what unchunked BatchNorm
  would have recorded. SyncBatchNorm's pooled moments are summed over ranks first.
- **DDP all-reduces once**: every chunk's backward but the last runs under ``no_sync()``.
- **GradScaler**: dL/dz comes from the scaled loss, so the parameter gradients carry the same
  scale as an unchunked step and ``scaler.step`` unscales them as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from simclr_embed.training import distributed as dist

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # z [2B, P] → (loss, top1)


def _batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def _stats_kept(bns: list[_BatchNorm]) -> Iterator[None]:
    """Run the block in train mode without it changing any running statistics."""
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in bns]  # fmt: skip
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(bns, saved, strict=True):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


@contextlib.contextmanager
def _one_update_from_all_chunks(bns: list[_BatchNorm]) -> Iterator[None]:
    """Record each chunk's per-channel sums at every BatchNorm's input; afterwards restore the
    buffers and apply one momentum update with the moments of all rows together."""
    sums: dict[int, list[torch.Tensor]] = {}  # id → [count, Σx [C], Σx² [C]] (float64)

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]  # all but channels
        var, mean = torch.var_mean(x.float(), dims, unbiased=False)  # [C] each, no x² copy
        n = x.numel() // x.shape[1]
        mean64 = mean.double()
        acc = sums.setdefault(id(module), [torch.zeros((), dtype=torch.float64, device=x.device),
                                           torch.zeros_like(mean64), torch.zeros_like(mean64)])  # fmt: skip
        acc[0] += n
        acc[1] += n * mean64  # Σx
        acc[2] += n * (var.double() + mean64 * mean64)  # Σx²

    hooks = [m.register_forward_pre_hook(record) for m in bns]
    try:
        with _stats_kept(bns):
            yield
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for m in bns:
            if id(m) not in sums:
                continue
            n, s1, s2 = sums[id(m)]
            if isinstance(m, nn.SyncBatchNorm) and dist.world_size() > 1:
                packed = torch.cat([n.reshape(1), s1, s2])
                packed = dist.all_reduce_sum(packed)
                n, s1, s2 = packed[0], packed[1 : 1 + len(s1)], packed[1 + len(s1) :]
            mean = s1 / n
            var = (s2 / n - mean * mean).clamp_min(0) * (n / (n - 1).clamp_min(1))  # unbiased
            m.num_batches_tracked += 1
            momentum = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)
            m.running_mean.mul_(1 - momentum).add_(mean.to(m.running_mean.dtype), alpha=momentum)
            m.running_var.mul_(1 - momentum).add_(var.to(m.running_var.dtype), alpha=momentum)


def cached_backward(
    model: nn.Module,
    x: torch.Tensor,
    chunk_size: int,
    loss_of: LossFn,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager[object]],
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one step over ``x`` ``[2B, 3, S, S]`` in chunks of ``chunk_size``
    rows; ``model(x) → (h, z)``; parameter gradients accumulate as one backward would leave
    them. Returns ``loss_of``'s (loss, top1), detached."""
    base = getattr(model, "_orig_mod", model)  # under torch.compile's wrapper
    ddp = base if isinstance(base, nn.parallel.DistributedDataParallel) else None
    bns = _batchnorms(ddp.module if ddp is not None else base)
    chunks = x.split(chunk_size)  # views of x: no copy
    with torch.no_grad(), _stats_kept(bns), autocast():  # the same (compiled) model both passes
        z = torch.cat([model(c)[1] for c in chunks])  # [2B, P], no graph kept
    z = z.float().requires_grad_()
    loss, top1 = loss_of(z)
    scale(loss).backward()  # z.grad [2B, P]: dL/dz for this rank's rows (the gather's backward)
    grads = z.grad.split(chunk_size)  # type: ignore[union-attr]
    with _one_update_from_all_chunks(bns):
        for i, (c, g) in enumerate(zip(chunks, grads, strict=True)):
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if last or ddp is None else ddp.no_sync():
                with autocast():
                    _, zc = model(c)  # [C, P]
                zc.float().backward(g)
    return loss.detach(), top1
