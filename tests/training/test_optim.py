"""LARS, parameter groups, lr scaling and the warmup-cosine schedule."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from torch import nn

from simclr_embed.training.model import SimCLRModel
from simclr_embed.training.optim import (
    LARS,
    build_optimizer,
    param_groups,
    scaled_lr,
    warmup_cosine,
)


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _expected_split(model: nn.Module) -> tuple[set[int], set[int]]:
    """Conv/linear weights decay; BN weights/biases and linear biases do not."""
    decay, exclude = set(), set()
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            decay.add(id(m.weight))
            if m.bias is not None:
                exclude.add(id(m.bias))
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.SyncBatchNorm):
            exclude |= {id(m.weight), id(m.bias)}
    return decay, exclude


@pytest.mark.parametrize("sync_bn", [False, True])
def test_param_groups_split_resnet(sync_bn: bool) -> None:
    model = SimCLRModel("resnet18", "standard", proj_dim=32)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    groups = param_groups(model, weight_decay=1e-6)
    decay, exclude = _expected_split(model)
    assert len(groups) == 2
    assert groups[0] == {**groups[0], "weight_decay": 1e-6, "lars_exclude": False}
    assert groups[1] == {**groups[1], "weight_decay": 0.0, "lars_exclude": True}
    assert _ids(groups[0]["params"]) == decay
    assert _ids(groups[1]["params"]) == exclude
    assert len(decay) + len(exclude) == len(list(model.parameters()))
    # The projection head's BatchNorm1d and its Linear biases are among the excluded.
    assert any(p.ndim == 1 and p.shape[0] == model.feature_dim for p in groups[1]["params"])


class _Odd(nn.Module):
    """Names that lie about what a parameter is: the split must ignore names."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(3, 3))  # a matrix called "bias": decayed
        self.weight = nn.Parameter(torch.ones(3))  # a vector called "weight": excluded
        self.ln = nn.LayerNorm((4, 5))  # 2-D norm weight: excluded by module type
        self.gn = nn.GroupNorm(2, 4)
        self.shared = nn.Linear(4, 4, bias=False)
        self.shared_again = self.shared  # the same parameter twice: listed once
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_by_type_and_ndim_not_name() -> None:
    m = _Odd()
    decay, exclude = (_ids(g["params"]) for g in param_groups(m, weight_decay=0.1))
    assert decay == {id(m.bias), id(m.shared.weight)}
    assert exclude == {id(m.weight), id(m.ln.weight), id(m.ln.bias), id(m.gn.weight), id(m.gn.bias)}
    assert m.ln.weight.ndim == 2


def test_param_groups_drop_an_empty_group() -> None:
    groups = param_groups(nn.Linear(3, 2, bias=False), weight_decay=0.1)
    assert [g["lars_exclude"] for g in groups] == [False]


def test_lars_step_matches_hand_computation() -> None:
    lr, wd, eta, mom = 2.0, 0.1, 1e-3, 0.9
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ‖w‖ = 5
    b = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = LARS(
        [
            {"params": [w], "weight_decay": wd, "lars_exclude": False},
            # weight_decay here must be ignored: excluded params are plain momentum SGD.
            {"params": [b], "weight_decay": wd, "lars_exclude": True},
        ],
        lr=lr,
        momentum=mom,
        trust_coefficient=eta,
    )
    # Step 1: g = [0.6, 0.8], ‖g‖ = 1 → trust = 1e-3·5 / (1 + 0.1·5) = 1/300,
    # d = trust·(g + wd·w) = (1/300)·[0.9, 1.2] = [0.003, 0.004]; buf = d; w −= lr·buf.
    w.grad = torch.tensor([0.6, 0.8])
    b.grad = torch.tensor([0.5, 0.5])
    opt.step()
    w1 = [3.0 - lr * 0.003, 4.0 - lr * 0.004]
    b1 = [1.0 - lr * 0.5, -2.0 - lr * 0.5]
    torch.testing.assert_close(w, torch.tensor(w1))
    torch.testing.assert_close(b, torch.tensor(b1))

    # Step 2 with momentum: g = [0, 2].
    w.grad = torch.tensor([0.0, 2.0])
    b.grad = torch.tensor([-1.0, 0.0])
    opt.step()
    wn = math.hypot(*w1)
    trust = eta * wn / (2.0 + wd * wn)
    d2 = [trust * (0.0 + wd * w1[0]), trust * (2.0 + wd * w1[1])]
    buf = [mom * 0.003 + d2[0], mom * 0.004 + d2[1]]
    torch.testing.assert_close(w, torch.tensor([w1[0] - lr * buf[0], w1[1] - lr * buf[1]]))
    bbuf = [mom * 0.5 - 1.0, mom * 0.5 + 0.0]
    torch.testing.assert_close(b, torch.tensor([b1[0] - lr * bbuf[0], b1[1] - lr * bbuf[1]]))


def test_lars_excluded_group_is_torch_sgd() -> None:
    torch.manual_seed(0)
    p1 = nn.Parameter(torch.randn(5, 3))
    p2 = nn.Parameter(p1.detach().clone())
    lars = LARS([{"params": [p1], "lars_exclude": True}], lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD([p2], lr=0.1, momentum=0.9)
    for _ in range(4):
        g = torch.randn(5, 3)
        p1.grad, p2.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(p1, p2)


def test_lars_zero_weight_takes_a_plain_step() -> None:
    # ‖w‖ = 0 (e.g. a zero-initialized layer): trust ratio 1, not 0 (which would freeze it).
    w = nn.Parameter(torch.zeros(3))
    opt = LARS([w], lr=0.5, weight_decay=0.1)
    w.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    torch.testing.assert_close(w, torch.tensor([-0.5, -1.0, -1.5]))


def test_build_optimizer_kinds() -> None:
    model = SimCLRModel("resnet18", "standard", proj_dim=16)
    lars = build_optimizer("lars", model, lr=0.6, weight_decay=1e-6)
    sgd = build_optimizer("sgd", model, lr=0.6, weight_decay=1e-4)
    adamw = build_optimizer("adamw", model, lr=1e-3, weight_decay=0.05)
    assert (
        isinstance(lars, LARS)
        and isinstance(sgd, torch.optim.SGD)
        and isinstance(adamw, torch.optim.AdamW)
    )
    assert lars.defaults["trust_coefficient"] == 1e-3 and lars.defaults["momentum"] == 0.9
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is False
    for opt, wd in ((lars, 1e-6), (sgd, 1e-4), (adamw, 0.05)):
        assert [g["weight_decay"] for g in opt.param_groups] == [wd, 0.0]
        assert [g["lars_exclude"] for g in opt.param_groups] == [False, True]
        assert all(g["lr"] == opt.defaults["lr"] for g in opt.param_groups)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("adam", model, lr=0.1, weight_decay=0.0)


def _lrs(warmup: int, total: int, steps: int, base: float = 0.8) -> list[float]:
    """The lr each optimizer step s = 0..steps-1 runs with."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = warmup_cosine(opt, warmup, total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros(1)
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_values() -> None:
    base, warmup, total = 0.8, 10, 110
    lrs = _lrs(warmup, total, total + 3, base)
    assert 0 < lrs[0] == pytest.approx(base / (warmup + 1))  # starts near 0, not at 0
    assert all(a < b for a, b in itertools.pairwise(lrs[: warmup + 1]))  # up to the peak
    assert lrs[warmup - 1] - lrs[warmup - 2] == pytest.approx(base / (warmup + 1))
    assert lrs[warmup] == pytest.approx(base)  # peak at the end of warmup
    assert lrs[warmup + 50] == pytest.approx(base / 2)  # halfway through the cosine
    assert lrs[warmup + 25] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi / 4)))
    assert all(a > b for a, b in itertools.pairwise(lrs[warmup:total]))  # then down
    assert 0 < lrs[total - 1] < 1e-3 * base
    assert lrs[total:] == [0.0, 0.0, 0.0]  # at and past the end
    assert _lrs(0, 4, 1, base) == [pytest.approx(base)]  # no warmup: start at the peak


def test_warmup_cosine_rejects_bad_lengths() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(opt, 0, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(opt, -1, 10)


def _roundtrip(obj: dict) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_state_dict_round_trip_resumes_exactly(name: str) -> None:
    """Optimizer + scheduler restored after k steps continue bit for bit like the original."""

    def setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        opt = build_optimizer(name, model, lr=0.5, weight_decay=1e-3)
        return model, opt, warmup_cosine(opt, warmup_steps=3, total_steps=12)

    def train(model, opt, sched, steps: range) -> list[float]:
        lrs = []
        for s in steps:
            x = torch.randn(6, 4, generator=torch.Generator().manual_seed(s))
            model(x).pow(2).mean().backward()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        return lrs

    model, opt, sched = setup()
    lrs_straight = train(model, opt, sched, range(10))

    model2, opt2, sched2 = setup()
    train(model2, opt2, sched2, range(4))
    saved = _roundtrip(
        {
            "model": model2.state_dict(),
            "optimizer": opt2.state_dict(),
            "scheduler": sched2.state_dict(),
        }
    )
    model3, opt3, sched3 = setup()
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["optimizer"])
    sched3.load_state_dict(saved["scheduler"])
    lrs_resumed = train(model3, opt3, sched3, range(4, 10))

    assert lrs_resumed == lrs_straight[4:]
    for a, b in zip(model.state_dict().values(), model3.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_scaled_lr() -> None:
    assert scaled_lr(0.3, 256) == pytest.approx(0.3)
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)  # SimCLR: 0.3 × B/256
    assert scaled_lr(0.3, 256, "sqrt") == pytest.approx(0.3)
    assert scaled_lr(1.2, 4096, "sqrt") == pytest.approx(0.075 * math.sqrt(4096))  # paper's rule
    assert scaled_lr(0.5, 64, "sqrt") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="scaling"):
        scaled_lr(0.3, 256, "log")
    with pytest.raises(ValueError, match="batch"):
        scaled_lr(0.3, 0)
    with pytest.raises(ValueError, match="base lr"):
        scaled_lr(-0.1, 256)
