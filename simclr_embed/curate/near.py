"""Near-duplicate groups in which every pair of members is a near-duplicate pair.

``simclr neighbors --duplicates`` joins images along the neighbour graph (connected components),
so five different blue-sky photos chain into one group through pairs each just above the
threshold. Here a group is a clique: candidate pairs (each image's nearest neighbours at cosine
≥ T) are taken most similar first, and two groups merge only when *every* cross pair is ≥ T
(complete linkage cut at T). Each group's representative is its medoid (the member most
similar to the others); the others follow by their similarity to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simclr_embed.neighbors.search import Neighbors


@dataclass(frozen=True)
class NearGroup:
    """``members`` rows (the representative first) and their cosine to the representative."""

    members: np.ndarray
    similarities: np.ndarray


def near_groups(unit: np.ndarray, found: Neighbors, threshold: float) -> list[NearGroup]:
    """Cliques of unit rows ``[N, D]`` at cosine ≥ ``threshold``, largest first."""
    src, col = np.nonzero(found.similarities >= threshold)
    if len(src) == 0:
        return []
    dst = found.indices[src, col]
    sims = found.similarities[src, col]
    a, b = np.minimum(src, dst), np.maximum(src, dst)
    keep = a != b
    pairs = np.unique(np.stack([a[keep], b[keep]], 1), axis=0, return_index=True)
    edges, first = pairs
    strength = sims[keep][first]
    order = np.lexsort((edges[:, 1], edges[:, 0], -strength))  # strongest first, ties stable
    group_of: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    for i, j in edges[order].tolist():
        gi, gj = group_of.get(i), group_of.get(j)
        if gi is not None and gi == gj:
            continue
        left = members[gi] if gi is not None else [i]
        right = members[gj] if gj is not None else [j]
        if len(left) + len(right) > 2 and (unit[left] @ unit[right].T).min() < threshold:
            continue  # some cross pair is not a near-duplicate: no chaining
        gid = gi if gi is not None else gj if gj is not None else i
        merged = left + right
        for gone in {gi, gj} - {gid, None}:
            del members[gone]  # type: ignore[arg-type]
        members[gid] = merged
        for row in merged:
            group_of[row] = gid
    groups = []
    for rows in members.values():
        rows_arr = np.array(sorted(rows))
        block = unit[rows_arr] @ unit[rows_arr].T  # [m, m]
        rep = int(np.argmax(block.sum(axis=1)))  # the medoid; lowest row on a tie
        to_rep = block[rep]
        rest = [k for k in np.lexsort((rows_arr, -to_rep)) if k != rep]
        picked = [rep, *rest]
        groups.append(NearGroup(rows_arr[picked], to_rep[picked].astype(np.float32)))
    groups.sort(key=lambda g: (-len(g.members), int(g.members.min())))
    return groups
