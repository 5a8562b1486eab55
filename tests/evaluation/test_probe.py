"""Linear probe: reaches the optimum of its convex objective, separates what is separable."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from simclr_embed.evaluation.probe import (
    DEFAULT_L2_GRID,
    fit_linear,
    holdout_split,
    linear_probe,
    standardize,
)


def test_standardize_uses_train_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.randn(500, 4, generator=g) * torch.tensor([1.0, 10.0, 0.1, 0.0]) + 5
    query = torch.full((3, 4), 5.0)
    xtr, xq = standardize(train, query)
    assert torch.allclose(xtr[:, :3].mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(xtr[:, :3].std(0), torch.ones(3), atol=1e-5)
    assert torch.all(xtr[:, 3] == 0)  # a constant feature stays finite (0), no division by 0
    expected = (query - train.mean(0)) / train.std(0).clamp_min(1e-6)
    assert torch.allclose(xq, expected)


def test_fit_reaches_the_stationary_point() -> None:
    # The objective is strictly convex (l2 > 0): at the optimum its gradient vanishes. Check it
    # with autograd, independently of the optimizer.
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 10, generator=g), torch.randint(0, 3, (300,), generator=g)
    l2 = 1e-2
    layer, loss, n_iter = fit_linear(x, y, 3, iterations=500, l2=l2)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    objective = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * w.square().sum()
    gw, gb = torch.autograd.grad(objective, (w, b))
    assert 0 < n_iter <= 500
    assert abs(objective.item() - loss) < 1e-5
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4
    # Randomly labeled data is not separable: the optimum is far above 0 and below log(3).
    assert 0.5 < loss < 1.0986


def test_separable_features_give_100_percent() -> None:
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(4).repeat_interleave(50)  # [200]
    directions = torch.randn(4, 64, generator=g)
    train = directions[labels] * 3 + torch.randn(200, 64, generator=g)
    qlabels = torch.arange(4).repeat_interleave(25)
    query = directions[qlabels] * 3 + torch.randn(100, 64, generator=g)
    result = linear_probe(train, labels, query, qlabels, 4, iterations=100)
    assert result.top1 == 1.0 and result.train_top1 == 1.0


def test_shuffled_labels_give_about_chance_and_no_gradient_reaches_features() -> None:
    g = torch.Generator().manual_seed(3)
    train = torch.randn(2000, 16, generator=g).requires_grad_(True)
    labels = torch.randint(0, 5, (2000,), generator=g)
    query, qlabels = torch.randn(2000, 16, generator=g), torch.randint(0, 5, (2000,), generator=g)
    result = linear_probe(train, labels, query, qlabels, 5, iterations=100)
    assert 0.16 < result.top1 < 0.24  # chance 0.20
    assert train.grad is None  # frozen features: the probe never back-propagates into them


def test_warm_start_reaches_the_same_optimum() -> None:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 3, (200,), generator=g)
    cold, cold_loss, _ = fit_linear(x, y, 3, iterations=500, l2=1e-2)
    start, _, _ = fit_linear(x, y, 3, iterations=500, l2=1.0)
    warm, warm_loss, _ = fit_linear(x, y, 3, iterations=500, l2=1e-2, init=start)
    assert abs(cold_loss - warm_loss) < 1e-6
    assert torch.allclose(cold.weight, warm.weight, atol=1e-3)


def test_holdout_split_is_stratified_and_disjoint() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 20)[torch.randperm(35)]
    fit, held = holdout_split(labels)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(35))
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 4]
    assert torch.equal(holdout_split(labels)[1], held)  # deterministic


def test_auto_l2_picks_the_best_held_out_value() -> None:
    # 2 informative dimensions buried in 300 noise dimensions, few samples: a weak penalty
    # overfits the noise, so the held-out choice must be a strong one, and it must be the argmax
    # of the scores it reports.
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 2, (150,), generator=g)
    x = torch.randn(150, 302, generator=g)
    x[:, :2] += (y[:, None].float() * 2 - 1) * 1.0
    yq = torch.randint(0, 2, (400,), generator=g)
    xq = torch.randn(400, 302, generator=g)
    xq[:, :2] += (yq[:, None].float() * 2 - 1) * 1.0
    auto = linear_probe(x, y, xq, yq, 2, iterations=200)
    assert set(auto.l2_scores) == set(DEFAULT_L2_GRID)
    assert auto.l2_scores[auto.l2] == max(auto.l2_scores.values())
    assert auto.l2 >= 0.1
    weak = linear_probe(x, y, xq, yq, 2, iterations=200, l2=1e-4)
    assert weak.l2_scores == {} and weak.train_top1 == 1.0  # memorizes the noise
    assert auto.top1 >= weak.top1
