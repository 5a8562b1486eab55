"""How unusual each image is, by one of two scores (``--outlier-score``):

- ``knn`` (default): one minus its mean cosine to its k nearest other images — local isolation,
  the score that needs no assumption about the collection's shape. An image with byte copies is
  not made ordinary by them: the copies are left out of its neighbours' mean.
- ``mean``: one minus its cosine to the collection's mean direction — how far from the typical
  image. Measured on photos with planted foreign images (docs/benchmarks.md "Curate"), a briefly
  trained model puts blank and synthetic images *next to* plain-background photos, where no k-NN
  score can find them, while they stay far from the mean.
"""

from __future__ import annotations

import numpy as np

from simclr_embed.neighbors.search import Neighbors


def outlier_scores(found: Neighbors, copy_of: np.ndarray) -> np.ndarray:
    """``[N]`` scores in [0, 2] (higher = more unusual). ``copy_of[i]``: the first row of i's
    exact-duplicate group (i itself when it has none)."""
    same = copy_of[found.indices] == copy_of[:, None]  # [N, k] neighbours that are byte copies
    sims = np.where(same, np.nan, found.similarities)
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(sims, axis=1)
    mean = np.where(np.isnan(mean), 1.0, mean)  # all k neighbours are copies: not an outlier
    return (1.0 - mean).astype(np.float32)


def ranked(scores: np.ndarray) -> np.ndarray:
    """Rows, most unusual first (ties by row)."""
    return np.lexsort((np.arange(len(scores)), -scores))


def mean_direction_scores(unit: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """``[N]`` one minus each unit row's cosine to the rows' mean direction (in [0, 2])."""
    total = np.zeros(unit.shape[1], np.float64)
    for start in range(0, len(unit), chunk):  # bounded extra memory for a million rows
        total += unit[start : start + chunk].sum(axis=0, dtype=np.float64)
    norm = float(np.linalg.norm(total))
    if norm == 0.0:
        return np.zeros(len(unit), np.float32)
    direction = (total / norm).astype(np.float32)
    return (1.0 - unit @ direction).astype(np.float32)
