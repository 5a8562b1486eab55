"""How unusual each image is: one minus its mean cosine to its k nearest other images (k-NN
distance, the score that needs no assumption about the collection's shape). An image with byte
copies is not made ordinary by them: the copies are left out of its neighbours' mean."""

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
