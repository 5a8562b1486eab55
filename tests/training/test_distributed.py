"""simclr_embed.training.distributed without torchrun: one process, no process group, identities.

The multi-process behaviour (real gloo group) is tested in test_loss_ddp.py.
"""

from __future__ import annotations

import pytest
import torch

from simclr_embed.errors import SimclrError
from simclr_embed.training import distributed


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_single_process_state() -> None:
    assert distributed.init_distributed("cpu") == torch.device("cpu")
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.init_distributed("auto").type == expected_auto
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.is_primary()
    distributed.barrier()  # no-ops, must not raise
    distributed.cleanup()


def test_world_size_one_under_torchrun_makes_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.init_distributed("cpu") == torch.device("cpu")
    assert not distributed.is_distributed()


def test_single_process_collectives_are_identities() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    mean = distributed.all_reduce_mean(x)
    assert torch.equal(mean, x.detach()) and not mean.requires_grad
    assert mean.data_ptr() != x.data_ptr()  # a copy: logging it never aliases the loss
    count = distributed.all_reduce_mean(torch.tensor(3))
    assert count.dtype == torch.float32 and count.item() == 3.0
    obj = {"out": "/tmp/run", "step": 3}
    assert distributed.broadcast_object(obj) is obj


def test_bad_device_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SimclrError, match="device"):
        distributed.init_distributed("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SimclrError, match="no CUDA device"):
        distributed.init_distributed("cuda")
    assert distributed.init_distributed("auto") == torch.device("cpu")


def test_malformed_env_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(SimclrError, match="WORLD_SIZE"):
        distributed.init_distributed("cpu")
