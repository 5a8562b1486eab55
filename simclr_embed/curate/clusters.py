"""Clusters of the collection: spherical k-means (FAISS), each cluster's images ranked by their
cosine to its centroid (rank 0 = its most central image).

``--clusters auto`` picks K by the silhouette (cosine) of a sample of at most ``SAMPLE`` images
over K in ``CANDIDATES`` up to ``sqrt(N)``: the K whose clusters are tightest relative to their
distance from the next cluster. Printed with the scores it compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simclr_embed.neighbors.search import faiss_module

CANDIDATES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
SAMPLE = 4000
NITER = 20


@dataclass(frozen=True)
class Clusters:
    labels: np.ndarray  # [N] int
    similarity: np.ndarray  # [N] cosine to its centroid
    rank: np.ndarray  # [N] 0 = the cluster's most central image
    k: int
    how: str  # how K was chosen


def kmeans(unit: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k, D] unit, labels [N]) of unit rows."""
    faiss = faiss_module()
    km = faiss.Kmeans(unit.shape[1], k, niter=NITER, seed=seed, spherical=True, verbose=False)
    km.train(unit)
    _, labels = km.index.search(unit, 1)
    return km.centroids, labels[:, 0]


def silhouette(unit: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with cosine distance (rows ``[n, D]`` unit; n ≲ a few thousand)."""
    dist = 1.0 - unit @ unit.T  # [n, n]
    ks = np.unique(labels)
    if len(ks) < 2:
        return -1.0
    mean_to = np.stack([dist[:, labels == c].mean(axis=1) for c in ks], 1)  # [n, K]
    own = np.searchsorted(ks, labels)
    sizes = np.array([(labels == c).sum() for c in ks])
    a = mean_to[np.arange(len(unit)), own] * sizes[own] / np.maximum(sizes[own] - 1, 1)
    mean_to[np.arange(len(unit)), own] = np.inf
    b = mean_to.min(axis=1)
    s = np.where(sizes[own] > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def choose_k(unit: np.ndarray, seed: int = 0) -> tuple[int, str]:
    n = len(unit)
    rng = np.random.default_rng(seed)
    sample = unit[np.sort(rng.choice(n, min(n, SAMPLE), replace=False))]
    top = max(2, int(math.sqrt(n)))
    scores = {}
    most = min(top, len(sample) - 1, len(sample) // 39)  # FAISS wants >= 39 points a centroid
    for k in (c for c in CANDIDATES if c <= max(2, most)):
        _, labels = kmeans(sample, k, seed)
        scores[k] = silhouette(sample, labels)
    if not scores:
        return 1, "one cluster (too few images to split)"
    best = max(scores, key=lambda k: (scores[k], -k))
    shown = ", ".join(f"{k}: {s:.3f}" for k, s in scores.items())
    return best, f"K = {best} by silhouette on {len(sample)} images ({shown})"


def cluster(unit: np.ndarray, k: int | None, seed: int = 0) -> Clusters:
    """``k`` None: :func:`choose_k`."""
    how = f"K = {k} (given)"
    if k is None:
        k, how = choose_k(unit, seed)
    k = max(1, min(k, len(unit)))
    if k == 1:
        centroid = unit.mean(axis=0, keepdims=True)
        centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
        labels = np.zeros(len(unit), np.int64)
        centroids = centroid
    else:
        centroids, labels = kmeans(unit, k, seed)
    sims = np.einsum("nd,nd->n", unit, centroids[labels]).astype(np.float32)
    order = np.lexsort((np.arange(len(unit)), -sims, labels))  # by cluster, most central first
    rank = np.empty(len(unit), np.int64)
    starts = np.searchsorted(labels[order], np.arange(k))
    rank[order] = np.arange(len(unit)) - np.repeat(starts, np.bincount(labels, minlength=k))
    return Clusters(labels.astype(np.int64), sims, rank, k, how)
