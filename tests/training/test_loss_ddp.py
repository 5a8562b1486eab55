"""Two real gloo processes holding half a batch each == one process holding the whole batch."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from simclr_embed.training import distributed
from simclr_embed.training.loss import nt_xent_loss, nt_xent_loss_and_accuracy

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(180)]

WORLD = 2
N_TOTAL = 8  # images in the global batch; N_TOTAL / WORLD per process
IN_DIM, OUT_DIM = 12, 16
TAU = 0.2
DEADLINE_S = 120.0  # the spawned group is killed after this: the test can never hang


def _problem() -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    """The same two views [N_TOTAL, IN_DIM] and encoder in every process (shared seeds)."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(N_TOTAL, IN_DIM, generator=g)
    x1 = base + 0.5 * torch.randn(N_TOTAL, IN_DIM, generator=g)
    x2 = base + 0.5 * torch.randn(N_TOTAL, IN_DIM, generator=g)
    torch.manual_seed(3)
    return x1, x2, nn.Linear(IN_DIM, OUT_DIM)


def _encode(encoder: nn.Module, x1: torch.Tensor, x2: torch.Tensor):
    # One forward over both views, as the training step does: [2n, OUT_DIM] → two [n, OUT_DIM].
    z = encoder(torch.cat([x1, x2]))
    return z, *z.chunk(2)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    # What torchrun would set for this process.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    device = distributed.init_distributed("cpu")
    try:
        x1, x2, encoder = _problem()
        n = N_TOTAL // world
        mine = slice(rank * n, (rank + 1) * n)
        out: dict[str, Any] = {
            "device": str(device),
            "rank": distributed.rank(),
            "world": distributed.world_size(),
            "primary": distributed.is_primary(),
            "broadcast": distributed.broadcast_object({"from": rank}),
        }

        # 1. DDP: gradients averaged over ranks must equal the single-process gradients.
        ddp = DistributedDataParallel(encoder)
        _, z1, z2 = _encode(ddp, x1[mine], x2[mine])
        loss, acc = nt_xent_loss_and_accuracy(z1, z2, TAU)
        loss.backward()
        out["loss"] = loss.detach()
        out["acc"] = acc
        out["loss_mean"] = distributed.all_reduce_mean(loss)
        out["acc_mean"] = distributed.all_reduce_mean(acc)
        out["ddp_grads"] = [p.grad.clone() for p in encoder.parameters()]

        # 2. No DDP: the raw gradient reaching this rank's embeddings (through the gather).
        _, _, plain = _problem()
        z, z1, z2 = _encode(plain, x1[mine], x2[mine])
        z.retain_grad()
        nt_xent_loss(z1, z2, TAU).backward()
        out["z_grad"] = z.grad.clone()  # [2n, OUT_DIM]: rows of view 1 then view 2
        out["raw_grads"] = [p.grad.clone() for p in plain.parameters()]

        # 3. gather_with_grad alone, with a different loss on each rank: rank r's loss is
        # (r + 1)·Σ w ⊙ gathered, so every rank's rows get Σ_r (r + 1) · w[their rows].
        x = torch.full((3, 2), float(rank), requires_grad=True)
        gathered = distributed.gather_with_grad(x)  # [3·world, 2]
        w = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)
        ((rank + 1) * (w * gathered).sum()).backward()
        out["gathered"] = gathered.detach()
        out["gather_grad"] = x.grad.clone()
        out["gather_weights"] = w

        distributed.barrier()
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.cleanup()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(
        _worker,
        args=(WORLD, _free_port(), str(out_dir)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1.0):  # raises if a worker failed, with its traceback
            if time.monotonic() > deadline:
                pytest.fail(f"2-process gloo group did not finish within {DEADLINE_S:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    """One process, no process group, the whole batch."""
    assert not distributed.is_distributed()
    x1, x2, encoder = _problem()
    z, z1, z2 = _encode(encoder, x1, x2)
    z.retain_grad()
    loss, acc = nt_xent_loss_and_accuracy(z1, z2, TAU)
    loss.backward()
    return {
        "loss": loss.detach(),
        "acc": acc,
        "grads": [p.grad for p in encoder.parameters()],
        "z_grad": z.grad,  # [2·N_TOTAL, OUT_DIM]
    }


def test_process_group_state(ranks: list[dict[str, Any]]) -> None:
    for r, out in enumerate(ranks):
        assert out["device"] == "cpu"
        assert (out["rank"], out["world"], out["primary"]) == (r, WORLD, r == 0)
        assert out["broadcast"] == {"from": 0}


def test_loss_mean_over_ranks_equals_single_process_loss(ranks, single) -> None:
    # Every rank's anchors see all 2·N_TOTAL − 1 candidates, and their means average to the
    # global mean; the per-rank losses themselves differ (different anchors).
    mean = sum(out["loss"] for out in ranks) / WORLD
    torch.testing.assert_close(mean, single["loss"], rtol=0, atol=1e-5)
    for out in ranks:
        torch.testing.assert_close(out["loss_mean"], single["loss"], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["acc_mean"], single["acc"], rtol=0, atol=1e-6)
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])


def test_ddp_averaged_gradients_equal_single_process_gradients(ranks, single) -> None:
    for out in ranks:
        for got, want in zip(out["ddp_grads"], single["grads"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # Averaging the raw per-rank gradients by hand gives the same.
    for i, want in enumerate(single["grads"]):
        mean = sum(out["raw_grads"][i] for out in ranks) / WORLD
        torch.testing.assert_close(mean, want, rtol=0, atol=1e-5)


def test_embedding_gradients_reach_their_owner(ranks, single) -> None:
    # Without DDP's averaging each rank's rows hold ∂(Σ_r L_r)/∂z = WORLD · ∂L_global/∂z.
    n = N_TOTAL // WORLD
    full = single["z_grad"]  # rows: view 1 of all images, then view 2
    for r, out in enumerate(ranks):
        want = torch.cat([full[r * n : (r + 1) * n], full[N_TOTAL + r * n : N_TOTAL + (r + 1) * n]])
        torch.testing.assert_close(out["z_grad"], WORLD * want, rtol=0, atol=1e-5)


def test_gather_with_grad_order_and_backward(ranks) -> None:
    coefficient = sum(r + 1 for r in range(WORLD))  # 1 + 2: every rank's loss reaches every row
    for r, out in enumerate(ranks):
        rows = out["gathered"][:, 0]
        assert rows.tolist() == [float(s) for s in range(WORLD) for _ in range(3)]
        w = out["gather_weights"]
        torch.testing.assert_close(out["gather_grad"], coefficient * w[3 * r : 3 * (r + 1)])
