"""Nearest neighbours and near-duplicate groups of a set of vectors, on FAISS (cosine similarity).

    from simclr_embed.neighbors.search import nearest, duplicate_groups
    found = nearest(vectors, k=10)                  # every row's 10 nearest other rows
    groups = duplicate_groups(vectors, found, 0.97)  # near-copies, largest group first

Vectors are L2-normalized first, so the inner product is the cosine. Which index:

- ``exact`` — ``IndexFlatIP``: brute force, every answer exact. All-vs-all costs N²·D, so it is
  the choice up to ``EXACT_MAX`` vectors on a CPU (``bench/neighbors.py`` measures where it
  stops being fast) and at every size on a GPU (``faiss-gpu``: brute force is what a GPU does
  best).
- ``hnsw`` — ``IndexHNSWFlat`` (M = 32): a graph index. Chosen over IVF because it needs no
  training pass and no ``nprobe`` tuned to the data's clustering, adds vectors incrementally,
  and keeps recall@10 high at every size we measured (``docs/benchmarks.md``); it costs
  ~M·8 bytes of links per vector beside the vectors themselves.

Ties: answers are ordered by similarity, then by row index, so equal similarities come out in
a stable order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from simclr_embed.errors import SimclrError

INDEXES = ("auto", "exact", "hnsw")
# Where exact all-vs-all (N²) stops beating HNSW on 2 cores: 36 s vs 45 s at 100k vectors.
EXACT_MAX = 100_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
Progress = Callable[[int], None]  # called with the number of queries answered so far
CHUNK = 16_384  # queries per search call: bounds the [chunk, k] answers and shows progress


@dataclass(frozen=True)
class Neighbors:
    """``indices`` int64 ``[Q, k]`` (rows of the collection, nearest first) and their cosine
    ``similarities`` float32 ``[Q, k]``."""

    indices: np.ndarray
    similarities: np.ndarray


@dataclass(frozen=True)
class Group:
    """Near-copies: collection rows ``members`` (the group's first image, i.e. its lowest row,
    first; the rest by similarity to it) and each one's cosine ``similarities`` to the first."""

    members: np.ndarray
    similarities: np.ndarray


def faiss_module() -> Any:  # faiss ships no type stubs
    try:
        import faiss
    except ImportError:
        raise SimclrError("simclr neighbors needs FAISS: pip install 'simclr-embed[neighbors]'") from None  # fmt: skip
    return faiss


def normalized(vectors: np.ndarray) -> np.ndarray:
    """float32 ``[N, D]`` rows scaled to unit length (a zero row stays zero: similarity 0)."""
    unit = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(unit).all():
        bad = int(np.flatnonzero(~np.isfinite(unit).all(axis=1))[0])
        raise SimclrError(f"vector {bad} is not finite (NaN or Inf); the embeddings are damaged")
    norms = np.linalg.norm(unit, axis=1, keepdims=True)
    np.divide(unit, norms, out=unit, where=norms > 0)
    return unit


def gpu_count() -> int:
    faiss = faiss_module()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def choose_index(n: int, kind: str = "auto") -> str:
    if kind not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {kind!r}")
    if kind != "auto":
        return kind
    return "exact" if n <= EXACT_MAX or gpu_count() > 0 else "hnsw"


def build_index(unit: np.ndarray, kind: str = "auto", *, ef_search: int = 128) -> Any:
    """A FAISS index over unit rows ``[N, D]`` for inner-product (= cosine) search."""
    faiss = faiss_module()
    kind = choose_index(len(unit), kind)
    dim = unit.shape[1]
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
        if gpu_count() > 0:  # faiss-gpu: brute force on every GPU of this machine
            index = faiss.index_cpu_to_all_gpus(index)
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = ef_search
    index.add(unit)
    return index


def search(
    index: Any, queries: np.ndarray, k: int, *, progress: Progress | None = None
) -> Neighbors:
    """The ``k`` nearest rows of ``index`` to each unit query ``[Q, D]``."""
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(index.hnsw.efSearch, 2 * k)  # recall falls when ef ≈ k
    sims, rows = [], []
    for start in range(0, len(queries), CHUNK):
        s, i = index.search(np.ascontiguousarray(queries[start : start + CHUNK]), k)
        sims.append(s)
        rows.append(i)
        if progress is not None:
            progress(min(len(queries), start + CHUNK))
    s, i = np.concatenate(sims), np.concatenate(rows)
    if (i < 0).any():
        raise SimclrError(f"the index found fewer than {k} neighbours for some queries")
    order = np.lexsort((i, -s), axis=-1)  # by similarity, then by row: ties in a stable order
    return Neighbors(np.take_along_axis(i, order, 1), np.take_along_axis(s, order, 1))


def nearest(
    vectors: np.ndarray, k: int = 10, *, index: str = "auto", progress: Progress | None = None
) -> Neighbors:
    """Every row's ``k`` nearest *other* rows ``[N, k]`` (cosine), nearest first."""
    unit = normalized(vectors)
    return nearest_in(build_index(unit, index), unit, k, progress=progress)


def nearest_in(
    index: Any, unit: np.ndarray, k: int, *, progress: Progress | None = None
) -> Neighbors:
    """``nearest`` over an index already built on the unit rows ``unit`` ``[N, D]``."""
    n = len(unit)
    if not 1 <= k < n:
        raise SimclrError(f"--k {k} needs at least {k + 1} images; the collection has {n}")
    found = search(index, unit, k + 1, progress=progress)
    # Drop each row itself: where it is among its k + 1 answers take the other k, else (an
    # exact copy can outrank it on a tie) the first k.
    own = found.indices == np.arange(n)[:, None]
    keep = ~own
    keep[~own.any(axis=1), -1] = False
    return Neighbors(found.indices[keep].reshape(n, k), found.similarities[keep].reshape(n, k))


def duplicate_groups(vectors: np.ndarray, found: Neighbors, threshold: float) -> list[Group]:
    """Connected components of the neighbour graph's edges with cosine ≥ ``threshold``,
    largest first (then by first row); singletons are not groups."""
    n = len(vectors)
    parent = np.arange(n)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]  # path halving
            a = parent[a]
        return a

    src, col = np.nonzero(found.similarities >= threshold)
    for a, b in zip(src.tolist(), found.indices[src, col].tolist(), strict=True):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the lowest row is the root: the group's first
    if len(src) == 0:
        return []
    touched = np.unique(np.concatenate([src, found.indices[src, col]]))
    roots = np.array([root(int(a)) for a in touched])
    unit = normalized(vectors[touched])
    groups: list[Group] = []
    for r in np.unique(roots):
        members = touched[roots == r]  # ascending: the first is the root
        if len(members) < 2:
            continue
        vec = unit[roots == r]
        sims = vec @ vec[0]
        order = np.concatenate([[0], 1 + np.lexsort((members[1:], -sims[1:]))])
        groups.append(Group(members[order], sims[order].astype(np.float32)))
    groups.sort(key=lambda g: (-len(g.members), int(g.members[0])))
    return groups
