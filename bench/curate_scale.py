"""``simclr curate`` at scale: every vector stage (neighbours, near-duplicate cliques, outliers,
clusters with auto K, selection) on synthetic clustered unit vectors, each stage timed, the
process's peak RSS reported (results: docs/benchmarks.md "Curate").

    .venv/bin/python bench/curate_scale.py --n 1000000 --dim 128
    .venv/bin/python bench/curate_scale.py --n 100000 --dim 512

The file-hash stage (exact duplicates) reads files, so it is measured on real files by
bench/curate.py, not here. Vectors: 1,000 Gaussian clusters on the sphere (spread 0.3) plus 1 %
near-copies (noise 0.01) so the duplicate stage has work.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_embed.curate import clusters, near, outliers, selection
from simclr_embed.neighbors.search import build_index, choose_index, nearest_in


def synthetic(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        x = centers[rng.integers(0, 1000, m)] + 0.3 / np.sqrt(dim) * rng.standard_normal((m, dim)).astype(np.float32)  # fmt: skip
        out[s : s + m] = x
    copies = rng.choice(n, n // 100, replace=False)
    out[copies[1::2]] = out[copies[::2]][: len(copies[1::2])] + 0.01 / np.sqrt(dim) * rng.standard_normal((len(copies[1::2]), dim)).astype(np.float32)  # fmt: skip
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--select", type=int, default=1000)
    p.add_argument("--threshold", type=float, default=0.98)
    args = p.parse_args()
    rows = []

    def stage(name: str, fn, *a):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = fn(*a)
        rows.append((name, time.perf_counter() - t0, peak_rss_gb()))
        print(f"{name}: {rows[-1][1]:.1f} s, peak RSS so far {rows[-1][2]:.2f} GB", flush=True)
        return out

    unit = stage("make vectors", synthetic, args.n, args.dim)
    kind = choose_index(len(unit))
    index = stage(f"build index ({kind})", build_index, unit)
    found = stage("10 nearest neighbours", nearest_in, index, unit, 10)
    del index
    groups = stage("near-duplicate cliques", near.near_groups, unit, found, args.threshold)
    stage("outlier scores", outliers.outlier_scores, found, np.arange(len(unit)))
    result = stage("clusters (auto K)", clusters.cluster, unit, None)
    stage(f"selection ({args.select})", selection.select, unit, args.select, np.ones(len(unit), bool))  # fmt: skip
    total = sum(t for name, t, _ in rows if name != "make vectors")
    print(f"\n{args.n:,} × {args.dim} ({platform.processor() or platform.machine()}), "
          f"{len(groups)} near groups, {result.how}")  # fmt: skip
    print("| stage | seconds |\n|---|---|")
    for name, t, _ in rows[1:]:
        print(f"| {name} | {t:.1f} |")
    print(f"| **all vector stages** | **{total:.1f}** |\npeak RSS {peak_rss_gb():.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
