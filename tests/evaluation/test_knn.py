"""Weighted kNN against a brute-force loop written straight from the InstDisc vote (eq. 9)."""

from __future__ import annotations

import math

import pytest
import torch

from simclr_embed.training.knn import knn_predict, knn_top1


def brute_force_knn(
    train: list[list[float]],
    labels: list[int],
    queries: list[list[float]],
    num_classes: int,
    k: int,
    temperature: float,
) -> list[int]:
    """Plain Python: cosine to every training point, k best, vote sum(exp(cos/T)) per class."""

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    preds = []
    for q in queries:
        sims = sorted(
            ((cosine(q, t), lab) for t, lab in zip(train, labels, strict=True)), key=lambda s: -s[0]
        )
        votes = [0.0] * num_classes
        for sim, lab in sims[:k]:
            votes[lab] += math.exp(sim / temperature)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return preds


@pytest.mark.parametrize("k", [1, 5, 20, 1000])
@pytest.mark.parametrize("temperature", [0.07, 0.5, 2.0])
def test_matches_brute_force(k: int, temperature: float) -> None:
    g = torch.Generator().manual_seed(k * 7 + int(temperature * 100))
    train = torch.randn(120, 6, generator=g) * 3 + 0.5  # not normalized: knn must normalize
    labels = torch.randint(0, 4, (120,), generator=g)
    queries = torch.randn(40, 6, generator=g)
    expected = brute_force_knn(
        train.double().tolist(), labels.tolist(), queries.double().tolist(), 4, k, temperature
    )
    got = knn_predict(train, labels, queries, num_classes=4, k=k, temperature=temperature)
    assert got.dtype == torch.long and got.shape == (40,)
    assert got.tolist() == expected


def test_chunking_does_not_change_the_answer() -> None:
    g = torch.Generator().manual_seed(1)
    train, labels = torch.randn(300, 16, generator=g), torch.randint(0, 5, (300,), generator=g)
    queries = torch.randn(101, 16, generator=g)
    whole = knn_predict(train, labels, queries, 5, k=10)
    for chunk in (1, 7, 100, 101, 5000):
        assert torch.equal(knn_predict(train, labels, queries, 5, k=10, chunk_size=chunk), whole)


def test_separated_clusters_give_100_percent() -> None:
    g = torch.Generator().manual_seed(2)
    centres = torch.eye(8)[:5] * 10  # 5 orthogonal directions
    labels = torch.arange(5).repeat_interleave(40)  # [200]
    train = centres[labels] + torch.randn(200, 8, generator=g)
    qlabels = torch.arange(5).repeat_interleave(10)
    queries = centres[qlabels] + torch.randn(50, 8, generator=g)
    assert knn_top1(train, labels, queries, qlabels, 5) == 1.0


def test_shuffled_labels_give_about_chance() -> None:
    g = torch.Generator().manual_seed(3)
    train, labels = torch.randn(3000, 32, generator=g), torch.randint(0, 10, (3000,), generator=g)
    queries, qlabels = (
        torch.randn(2000, 32, generator=g),
        torch.randint(0, 10, (2000,), generator=g),
    )
    acc = knn_top1(train, labels, queries, qlabels, 10)
    assert 0.07 < acc < 0.13  # chance is 0.10; 3 standard errors ≈ 0.02


def test_k_is_clipped_and_a_single_neighbour_is_itself() -> None:
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1]])
    labels = torch.tensor([0, 1, 2])
    assert knn_predict(train, labels, train, 3, k=1).tolist() == [0, 1, 2]
    # k larger than the training set: every point votes; the closest still weighs the most.
    assert knn_predict(train, labels, train, 3, k=50).tolist() == [0, 1, 2]


def test_empty_query_and_bad_arguments() -> None:
    train, labels = torch.randn(10, 4), torch.randint(0, 2, (10,))
    assert knn_predict(train, labels, torch.zeros(0, 4), 2).shape == (0,)
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(train, labels, train, 2, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, labels, train, 2, temperature=0.0)
    with pytest.raises(ValueError, match="dimensions differ"):
        knn_predict(train, labels, torch.randn(3, 5), 2)
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(train, labels[:5], train, 2)
    with pytest.raises(ValueError, match="query_labels"):
        knn_top1(train, labels, train, labels[:3], 2)
