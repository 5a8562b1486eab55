"""Gradient caching (``--chunk-size``) against the unchunked step: the same parameter gradients
(BatchNorm in eval mode, so rows do not interact) on 1 process and on 2 real gloo processes
under DDP; BatchNorm running statistics updated once per step from the whole batch; the flag
checked and used end to end by ``simclr train``."""

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
from simclr_embed.training.gradcache import cached_backward
from simclr_embed.training.loss import nt_xent_loss_and_accuracy
from simclr_embed.training.model import SimCLRModel

B, CHUNK, S = 8, 4, 32  # per process: 2B = 16 rows in 4 chunks
REL = 1e-5


def _problem(seed: int = 0) -> tuple[SimCLRModel, torch.Tensor]:
    torch.manual_seed(seed)
    model = SimCLRModel("resnet18", "standard", proj_dim=16)
    x = torch.randn(2 * B * 2, 3, S, S)  # [2 ranks' worth of 2B rows]
    return model, x


def _bn_eval(model: nn.Module) -> nn.Module:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.eval()  # running statistics: rows independent, the gradient must be exact
    return model


def _no_autocast() -> torch.autocast:
    return torch.autocast("cpu", enabled=False)


def _loss_of(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z1, z2 = z.float().chunk(2)
    return nt_xent_loss_and_accuracy(z1, z2, 0.2)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return [p.grad.clone() for p in inner.parameters()]


def _full_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    _, z = model(x)
    loss, _ = _loss_of(z)
    loss.backward()
    return loss.detach(), _grads(model)


def _chunked_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss, _ = cached_backward(model, x, CHUNK, _loss_of, autocast=_no_autocast)
    return loss, _grads(model)


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for ga, gb in zip(a, b, strict=True):
        scale = gb.abs().max().clamp_min(1e-12)
        assert ((ga - gb).abs().max() / scale).item() <= REL


def test_chunked_gradients_equal_the_whole_batch_one_process() -> None:
    model, x = _problem()
    x = x[: 2 * B]
    full_loss, full = _full_step(_bn_eval(model), x)
    model.zero_grad(set_to_none=True)
    loss, chunked = _chunked_step(model, x)
    assert torch.allclose(loss, full_loss, rtol=1e-6)
    _assert_same(chunked, full)


def test_batchnorm_statistics_updated_once_from_the_whole_batch() -> None:
    """First BatchNorm: its input is the same chunked or not, so its running statistics after
    one chunked step equal one unchunked forward's; every BatchNorm counted one batch."""
    model, x = _problem()
    x = x[: 2 * B]
    ref = SimCLRModel("resnet18", "standard", proj_dim=16)
    ref.load_state_dict(model.state_dict())
    ref.train()
    with torch.no_grad():
        ref(x)
    model.train()
    cached_backward(model, x, CHUNK, _loss_of, autocast=_no_autocast)
    got, want = model.backbone.bn1, ref.backbone.bn1
    torch.testing.assert_close(got.running_mean, want.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.running_var, want.running_var, rtol=1e-5, atol=1e-6)
    counts = {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert counts == {1}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    distributed.init_distributed("cpu")
    try:
        model, x = _problem()
        mine = x[rank * 2 * B : (rank + 1) * 2 * B]  # this rank's 2B rows
        ddp = DistributedDataParallel(_bn_eval(model))
        full_loss, full = _full_step(ddp, mine)
        ddp.zero_grad(set_to_none=True)
        loss, chunked = _chunked_step(ddp, mine)
        torch.save({"full": full, "chunked": chunked, "loss": loss, "full_loss": full_loss},
                   Path(out_dir) / f"rank{rank}.pt")  # fmt: skip
    finally:
        distributed.cleanup()


@pytest.mark.ddp
def test_chunked_gradients_equal_the_whole_batch_two_gloo_ranks(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1.0):
            assert time.monotonic() < deadline, "the 2-process group did not finish"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    results: list[dict[str, Any]] = [
        torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)
    ]
    for r in results:
        assert torch.allclose(r["loss"], r["full_loss"], rtol=1e-6)
        _assert_same(r["chunked"], r["full"])
    _assert_same(results[0]["chunked"], results[1]["chunked"])  # DDP: one averaged gradient


def test_chunk_size_flag(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from simclr_embed.training.checkpoint import load_checkpoint
    from simclr_embed.training.cli import main

    common = ["--data", str(image_folder), "--device", "cpu", "--arch", "resnet18",
              "--image-size", "32", "--stem", "standard", "--proj-dim", "16", "--batch-size", "8",
              "--workers", "0", "--no-progress"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main([*common, "--out", str(tmp_path / "bad"), "--chunk-size", "3"])
    assert exit_.value.code == 2 and "--chunk-size" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "ok"), "--chunk-size", "4", "--max-steps", "2"]) == 0  # fmt: skip
    ckpt = load_checkpoint(tmp_path / "ok" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["chunk_size"] == 4
