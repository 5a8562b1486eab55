"""All distributed state of training lives here: the only module that reads torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or sets up ``torch.distributed``.

Every helper is correct without torchrun (one process, no process group): ``rank() == 0``,
``world_size() == 1``, collectives are identities.

Launch (one node, 8 GPUs)::

    torchrun --standalone --nproc-per-node 8 -m simclr_embed.training --data DIR --out OUT

Several nodes (run on each, same endpoint)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id simclr -m simclr_embed.training --data DIR --out OUT
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from simclr_embed.errors import SimclrError

log = logging.getLogger(__name__)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise SimclrError(f"environment variable {name}={value!r} is not an integer") from None


def _resolve_device(device: str) -> torch.device:
    """ "auto" → cuda if available else cpu; "cuda"/"cpu" explicit (cuda checked)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise SimclrError(f"--device must be auto, cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SimclrError("--device cuda requested but no CUDA device is available")
    return torch.device(device)


def init_distributed(device: str = "auto") -> torch.device:
    """Join the torchrun process group if there is one and return the device to compute on.

    With ``WORLD_SIZE > 1`` (set by torchrun) this initializes the default process group —
    NCCL on CUDA, gloo on CPU — and pins this process to GPU ``LOCAL_RANK``. Without torchrun it
    only picks the device. Calling it again after the group exists just returns the device.
    """
    kind = _resolve_device(device)
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    if kind.type == "cuda":
        if local >= torch.cuda.device_count():
            raise SimclrError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) visible; "
                "use --nproc-per-node ≤ the number of GPUs"
            )
        # Must happen before NCCL init so each process owns exactly one GPU.
        torch.cuda.set_device(local)
        kind = torch.device("cuda", local)
    if world > 1 and not is_distributed():
        backend = "nccl" if kind.type == "cuda" else "gloo"
        # A collective waiting longer than this raises instead of hanging forever (dead peer);
        # generous because rank 0 may run the kNN evaluation while the others wait.
        timeout = datetime.timedelta(minutes=_env_int("SIMCLR_DIST_TIMEOUT_MIN", 30))
        # env:// reads MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE set by torchrun.
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            timeout=timeout,
            device_id=kind if kind.type == "cuda" else None,
        )
        log.info("rank %d/%d joined the %s process group on %s", rank(), world, backend, kind)
        global _host_group
        # Host-side agreements (the stop flag, "can every rank read this file?") go over gloo,
        # so they never make a CUDA stream wait; on CPU the default group is gloo already.
        _host_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return kind


_host_group: Any = None  # a gloo group beside NCCL (None: use the default group)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one: one all-reduce of one int on
    the host (gloo), no GPU sync. Every rank must call it at the same point."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(t.item())


def min_over_ranks(value: float) -> float:
    """The smallest ``value`` of all ranks, on every rank (one host all-reduce; see
    :func:`any_rank`): the rate the slowest rank can keep."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_host_group)
    return float(t.item())


def all_ranks(flag: bool) -> bool:
    """True on every rank only when ``flag`` is True on all of them (see :func:`any_rank`)."""
    return not any_rank(not flag)


def is_distributed() -> bool:
    """True when a process group is initialized (i.e. under torchrun with WORLD_SIZE > 1)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank on this node (= GPU index); 0 without torchrun."""
    return _env_int("LOCAL_RANK", 0) if is_distributed() else 0


def is_primary() -> bool:
    """This process logs, shows progress and writes files (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; no-op when single."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (safe to call when none exists)."""
    global _host_group
    if is_distributed():
        dist.destroy_process_group()
    _host_group = None


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks, as a new detached tensor (a copy of ``t`` when single).

    For logging (loss, accuracy); integer tensors are averaged as float32.
    """
    out = t.detach().clone()
    if not out.is_floating_point():
        out = out.float()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= world_size()
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient back to the rows' owner.

    Forward: ``[N, D]`` on each rank → ``[W·N, D]``, rank r's rows at ``[r·N, (r+1)·N)``.
    Backward: each rank holds ∂L_r/∂(all rows); summing over ranks (all_reduce) gives
    ∂(Σ_r L_r)/∂(all rows), of which this rank keeps its own slice. DDP then averages parameter
    gradients over ranks, so the result is the gradient of the mean loss over all ranks.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)  # needs the same N on every rank (drop_last sampler)
        return torch.cat(parts, dim=0)  # [W·N, D]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # [W·N, D]; all_reduce is in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.n
        return grad[start : start + ctx.n]  # [N, D]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ``[N, D]`` from all ranks in rank order → ``[W·N, D]``, differentiable.

    Every rank must pass the same shape. Identity when not distributed.
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself when single."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, as a new detached tensor (a copy of ``t`` when single)."""
    out = t.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
