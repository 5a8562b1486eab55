"""The Python API against brute-force numpy: exact answers, ties, recall, duplicate groups."""

from __future__ import annotations

import numpy as np
import pytest

from simclr_embed.errors import SimclrError
from simclr_embed.neighbors.search import build_index, duplicate_groups, nearest, normalized, search


def brute_force(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k other rows by cosine, in float64, ties broken by row index."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit.astype(np.float64) @ unit.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(sims)), sims.shape), -sims), axis=-1)
    top = order[:, :k]
    return top, np.take_along_axis(sims, top, 1)


@pytest.mark.parametrize(("n", "dim", "k"), [(300, 8, 5), (1000, 64, 10), (50, 3, 49)])
def test_exact_equals_brute_force(n: int, dim: int, k: int) -> None:
    vectors = np.random.default_rng(n).standard_normal((n, dim)).astype(np.float32) * 3
    found = nearest(vectors, k, index="exact")
    want_rows, want_sims = brute_force(vectors, k)
    assert found.indices.shape == (n, k) and found.indices.dtype == np.int64
    np.testing.assert_allclose(found.similarities, want_sims, atol=1e-5)
    assert not (found.indices == np.arange(n)[:, None]).any()  # never itself
    # Rows agree wherever the reference's similarities are not tied within float32 rounding.
    gaps = np.diff(want_sims, axis=1)
    clear = np.ones_like(want_rows, dtype=bool)
    clear[:, :-1] &= gaps < -1e-5
    clear[:, 1:] &= gaps < -1e-5
    assert clear.mean() > 0.9
    assert (found.indices[clear] == want_rows[clear]).all()


def test_ties_come_out_in_row_order_and_copies_are_not_lost() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((40, 6)).astype(np.float32)
    vectors[[7, 21, 33]] = vectors[3]  # four identical rows
    vectors[21] *= 5.0  # same direction, other length: cosine 1 as well
    found = nearest(vectors, 4, index="exact")
    for row, others in ((3, [7, 21, 33]), (7, [3, 21, 33]), (21, [3, 7, 33]), (33, [3, 7, 21])):
        assert found.indices[row, :3].tolist() == others  # the tie, by row index
        np.testing.assert_allclose(found.similarities[row, :3], 1.0, atol=1e-6)


def test_hnsw_reaches_its_recall_against_exact() -> None:
    # Clustered data (as embeddings are), a few thousand vectors: recall@10 >= 0.95.
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 48)).astype(np.float32)
    vectors = centres[rng.integers(0, 40, 4000)] + 0.6 * rng.standard_normal((4000, 48))
    exact = nearest(vectors.astype(np.float32), 10, index="exact")
    approx = nearest(vectors.astype(np.float32), 10, index="hnsw")
    recall = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(exact.indices, approx.indices, strict=True)]
    )
    assert recall >= 0.95, recall


def test_queries_against_an_index() -> None:
    rng = np.random.default_rng(2)
    collection = rng.standard_normal((200, 16)).astype(np.float32)
    queries = collection[[5, 50]] + 0.01 * rng.standard_normal((2, 16)).astype(np.float32)
    found = search(build_index(normalized(collection), "exact"), normalized(queries), 3)
    assert found.indices[:, 0].tolist() == [5, 50]
    assert (found.similarities[:, 0] > 0.99).all()
    assert (np.diff(found.similarities, axis=1) <= 0).all()


def test_duplicate_groups_are_components_above_the_threshold() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((100, 32)).astype(np.float32)
    planted = {0: [10, 20], 5: [6, 7, 8, 9], 40: [41]}
    for first, copies in planted.items():
        for c in copies:
            vectors[c] = vectors[first] + 0.05 * rng.standard_normal(32).astype(np.float32)
    found = nearest(vectors, 5, index="exact")
    groups = duplicate_groups(vectors, found, 0.95)
    got = [g.members.tolist() for g in groups]
    # largest first; each group starts with its lowest row; the rest by similarity to it
    assert [sorted(m) for m in got] == [[5, 6, 7, 8, 9], [0, 10, 20], [40, 41]]
    assert [m[0] for m in got] == [5, 0, 40]
    unit = normalized(vectors)
    for group in groups:
        want = unit[group.members] @ unit[group.members[0]]
        np.testing.assert_allclose(group.similarities, want, atol=1e-6)
        assert (np.diff(group.similarities[1:]) <= 1e-7).all()
    assert duplicate_groups(vectors, found, 0.9999) == []


def test_bad_vectors_are_refused() -> None:
    vectors = np.random.default_rng(4).standard_normal((20, 4)).astype(np.float32)
    with pytest.raises(SimclrError, match="--k 20 needs at least 21 images"):
        nearest(vectors, 20)
    vectors[7, 2] = np.nan
    with pytest.raises(SimclrError, match="vector 7 is not finite"):
        nearest(vectors, 3)


def test_more_copies_than_k_never_answer_a_row_with_itself() -> None:
    vectors = np.random.default_rng(5).standard_normal((30, 5)).astype(np.float32)
    copies = [2, 4, 9, 13, 17, 25]
    vectors[copies] = vectors[2]
    found = nearest(vectors, 2, index="exact")  # 6 rows tie at cosine 1 for 3 answer slots
    for row in copies:
        got = found.indices[row].tolist()
        assert row not in got and len(set(got)) == 2 and set(got) <= set(copies)
        np.testing.assert_allclose(found.similarities[row], 1.0, atol=1e-6)
