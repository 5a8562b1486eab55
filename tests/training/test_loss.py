"""NT-Xent against a naive loop written straight from the SimCLR paper's Algorithm 1."""

from __future__ import annotations

import math

import pytest
import torch

from simclr_embed.training.loss import nt_xent_loss, nt_xent_loss_and_accuracy


def paper_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Algorithm 1 of Chen et al. 2020, one pair at a time (float64, differentiable).

    The 2N augmented samples are interleaved: z_{2k-1} = view 1 of image k, z_{2k} = view 2.
    s_ij = z_i·z_j / (‖z_i‖‖z_j‖);  l(i, j) = −log( exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ) );
    L = 1/(2N) Σ_k [ l(2k−1, 2k) + l(2k, 2k−1) ].
    """
    z = [v for pair in zip(z1.double(), z2.double(), strict=True) for v in pair]  # 2N vectors
    n2 = len(z)

    def s(i: int, j: int) -> torch.Tensor:
        return torch.dot(z[i], z[j]) / (
            torch.sqrt(torch.dot(z[i], z[i])) * torch.sqrt(torch.dot(z[j], z[j]))
        )

    def ell(i: int, j: int) -> torch.Tensor:
        denominator = sum(torch.exp(s(i, k) / tau) for k in range(n2) if k != i)
        return -torch.log(torch.exp(s(i, j) / tau) / denominator)

    # 0-based: images k = 0..N-1 sit at 2k and 2k+1.
    total = sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n2 // 2))
    return total / n2


def paper_accuracy(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Fraction of the 2N anchors whose most similar other sample is their positive."""
    z = [v for pair in zip(z1.double(), z2.double(), strict=True) for v in pair]
    hits = 0
    for i in range(len(z)):
        sims = {
            k: float(torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm()))
            for k in range(len(z))
            if k != i
        }
        hits += max(sims, key=sims.__getitem__) == (i ^ 1)  # partner of 2k is 2k+1 and back
    return hits / len(z)


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dim", [3, 16, 128])
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_loss_and_gradients_match_algorithm_1(batch: int, dim: int, temperature: float) -> None:
    g = torch.Generator().manual_seed(1000 * batch + dim)
    z1 = torch.randn(batch, dim, generator=g) * 3  # not normalized: the loss must normalize
    z2 = torch.randn(batch, dim, generator=g) * 0.5

    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = nt_xent_loss(a1, a2, temperature)
    loss.backward()

    r1, r2 = z1.double().requires_grad_(), z2.double().requires_grad_()
    ref = paper_loss(r1, r2, temperature)
    ref.backward()

    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a1.grad.double(), r1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a2.grad.double(), r2.grad, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_inputs_still_give_float32_loss() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=g)
    encoder = torch.nn.Linear(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = encoder(x)  # [16, 64] bf16
        assert z.dtype == torch.bfloat16
        loss = nt_xent_loss(z[:8], z[8:], 0.1)
    assert loss.dtype == torch.float32
    # Same bf16 values, computed by the reference in float64: a bf16 matmul inside the loss
    # would be off by ~1e-2 here.
    ref = paper_loss(z[:8].detach().float(), z[8:].detach().float(), 0.1)
    assert abs(loss.item() - ref.item()) < 1e-5
    loss.backward()
    assert torch.isfinite(encoder.weight.grad).all()


@pytest.mark.parametrize(
    "bad", [0, 0.0, -0.1, float("nan"), float("inf"), -float("inf"), "abc", None]
)
def test_invalid_temperature_is_a_clear_error(bad: object) -> None:
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(z, z.clone(), bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss_and_accuracy(z, z.clone(), bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shape1", "shape2"),
    [((4, 8), (4, 9)), ((4, 8), (5, 8)), ((8,), (8,)), ((2, 4, 8), (2, 4, 8)), ((0, 8), (0, 8))],
)
def test_bad_shapes_are_a_clear_error(shape1: tuple[int, ...], shape2: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"z1 and z2"):
        nt_xent_loss(torch.randn(shape1), torch.randn(shape2), 0.1)


def test_aligned_separated_embeddings_reach_the_closed_form_minimum() -> None:
    # Positives identical, all images orthogonal: every anchor sees exp(1/τ) for its positive and
    # 2N − 2 negatives at exp(0), so L = log(1 + (2N − 2)·exp(−1/τ)).
    n, tau = 6, 0.1
    z = torch.eye(n, 16) * 5.0
    loss, acc = nt_xent_loss_and_accuracy(z, z.clone(), tau)
    expected = math.log1p((2 * n - 2) * math.exp(-1 / tau))
    # float32 logsumexp around 1/τ = 10 resolves ~1e-6 absolute.
    assert loss.item() == pytest.approx(expected, abs=2e-6)
    assert loss.item() < 1e-3
    assert acc.item() == 1.0
    # Same embeddings with the pairs mismatched: far worse, and no anchor finds its positive.
    wrong, wrong_acc = nt_xent_loss_and_accuracy(z, z.roll(1, dims=0), tau)
    assert wrong.item() > 5.0 and wrong_acc.item() == 0.0
    random_loss = nt_xent_loss(torch.randn(n, 16), torch.randn(n, 16), tau)
    assert loss.item() < random_loss.item()


def test_identical_rows_and_tiny_temperature_stay_finite() -> None:
    # Every similarity is 1, including the masked diagonal: no NaN from the mask.
    z1 = torch.ones(5, 4, requires_grad=True)
    z2 = torch.ones(5, 4, requires_grad=True)
    loss = nt_xent_loss(z1, z2, 0.01)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2 * 5 - 1), rel=1e-5)  # uniform over 2N − 1
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_single_image_has_only_its_positive() -> None:
    z1 = torch.randn(1, 8, requires_grad=True)
    loss, acc = nt_xent_loss_and_accuracy(z1, torch.randn(1, 8), 0.1)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and acc.item() == 1.0
    assert torch.isfinite(z1.grad).all()


@pytest.mark.parametrize("seed", range(4))
def test_accuracy_matches_naive_argmax_and_loss_matches(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(10, 8, generator=g)
    # Noisy second views: some anchors find their positive, some do not.
    z1 = base + 0.6 * torch.randn(10, 8, generator=g)
    z2 = base + 0.6 * torch.randn(10, 8, generator=g)
    loss, acc = nt_xent_loss_and_accuracy(z1, z2, 0.2)
    assert not acc.requires_grad and acc.dtype == torch.float32
    assert acc.item() == pytest.approx(paper_accuracy(z1, z2), abs=1e-6)
    torch.testing.assert_close(loss, nt_xent_loss(z1, z2, 0.2))
