"""``--select N``: N images that cover the collection — greedy k-center (farthest-point
traversal) on the cosine distance: start from the image nearest the collection's mean, then
repeatedly take the image farthest from everything taken. A 2-approximation of the best cover
(Gonzalez 1985); it favours coverage over density, so rare kinds of image are picked early.
Byte copies of a taken image are never taken (only each exact-duplicate group's first row is a
candidate)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BLOCK = 262_144  # rows per distance update: bounds the temporary [block] arrays


def select(
    unit: np.ndarray,
    n: int,
    candidate: np.ndarray,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Up to ``n`` rows of unit vectors ``[N, D]`` among ``candidate`` (bool ``[N]``)."""
    rows = np.flatnonzero(candidate)
    n = min(n, len(rows))
    if n == 0:
        return np.zeros(0, np.int64)
    center = unit[rows].mean(axis=0)
    first = rows[int(np.argmax(unit[rows] @ center))]
    nearest = np.full(len(unit), np.inf, np.float32)  # distance to the closest taken image
    nearest[~candidate] = -np.inf  # never picked
    taken = [int(first)]
    for step in range(1, n):
        last = unit[taken[-1]]
        for start in range(0, len(unit), BLOCK):
            d = 1.0 - unit[start : start + BLOCK] @ last
            np.minimum(nearest[start : start + BLOCK], d, out=nearest[start : start + BLOCK])
        nearest[taken[-1]] = -np.inf
        taken.append(int(np.argmax(nearest)))
        if progress is not None and step % 64 == 0:
            progress(step)
    return np.array(taken, np.int64)
