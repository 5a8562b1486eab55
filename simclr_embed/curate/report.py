"""What ``simclr curate`` writes (CONTRACT §2): the TSV files, ``clusters.parquet``,
``selection.txt``, the gallery pages and the summary it prints — every file written atomically."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simclr_embed.curate.clusters import Clusters
from simclr_embed.curate.gallery import CLUSTER_SHOWN, Gallery, Section, Tile
from simclr_embed.curate.near import NearGroup
from simclr_embed.curate.outliers import ranked
from simclr_embed.fileio import atomic_path, atomic_write_text
from simclr_embed.neighbors.search import Neighbors


@dataclass(frozen=True)
class Results:
    paths: Sequence[str]
    found: Neighbors
    exact: list[list[int]]
    near: list[NearGroup]
    threshold: float
    threshold_how: str
    scores: np.ndarray
    clusters: Clusters
    selection: np.ndarray | None

    def summary(self, out: Path, top: int) -> str:
        lines = [
            f"{len(self.paths)} images → {out}",
            f"exact duplicates: {len(self.exact)} groups, {sum(map(len, self.exact))} files",
            f"near duplicates (cosine >= {self.threshold:.4f}): {len(self.near)} groups, "
            f"{sum(len(g.members) for g in self.near)} images",
            f"clusters: {self.clusters.k}",
        ]
        order = ranked(self.scores)[:top]
        if len(order):
            lines.append(f"most unusual ({min(top, 5)} of outliers.tsv):")
            lines += [f"  {self.scores[r]:.4f}  {self.paths[r]}" for r in order[:5]]
        if self.selection is not None:
            lines.append(f"selection: {len(self.selection)} images → {out / 'selection.txt'}")
        return "\n".join(lines)


def write_tables(out: Path, r: Results) -> None:
    paths = r.paths
    lines = ["group\tpath\n"]
    for g, rows in enumerate(r.exact):
        lines += [f"{g}\t{paths[row]}\n" for row in rows]
    atomic_write_text(out / "exact_duplicates.tsv", "".join(lines))
    lines = ["group\tpath\tsimilarity\n"]
    for g, group in enumerate(r.near):
        lines += [
            f"{g}\t{paths[int(m)]}\t{s:.4f}\n"
            for m, s in zip(group.members, group.similarities, strict=True)
        ]
    atomic_write_text(out / "duplicates.tsv", "".join(lines))
    order = ranked(r.scores)
    text = "path\tscore\n" + "".join(f"{paths[i]}\t{r.scores[i]:.5f}\n" for i in order)
    atomic_write_text(out / "outliers.tsv", text)
    _write_clusters(out / "clusters.parquet", paths, r.clusters)
    if r.selection is not None:
        atomic_write_text(out / "selection.txt", "".join(f"{paths[i]}\n" for i in r.selection))


def _write_clusters(path: Path, paths: Sequence[str], c: Clusters) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "cluster": pa.array(c.labels, pa.int32()),
            "rank": pa.array(c.rank, pa.int64()),  # 0 = the cluster's most central image
            "similarity": pa.array(c.similarity, pa.float32()),  # cosine to its centroid
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_gallery(out: Path, r: Results, top: int) -> int:
    """The static gallery; returns how many thumbnails could not be made."""
    neighbours = r.found

    def of(row: int) -> list[tuple[int, float]]:
        found = zip(
            neighbours.indices[row].tolist(), neighbours.similarities[row].tolist(), strict=True
        )
        return list(found)

    g = Gallery(out, r.paths, of)
    dup_sections = [
        Section(
            f"exact group {i} ({len(rows)} identical files)", [Tile(x, "identical") for x in rows]
        )
        for i, rows in enumerate(r.exact)
    ] + [
        Section(
            f"near group {i} ({len(grp.members)} images)",
            [
                Tile(int(m), "representative" if j == 0 else f"cosine {s:.3f}")
                for j, (m, s) in enumerate(zip(grp.members, grp.similarities, strict=True))
            ],
        )
        for i, grp in enumerate(r.near)
    ]
    g.paged("duplicates", "Duplicates", dup_sections, html.escape(f"near-duplicate threshold {r.threshold:.4f}: {r.threshold_how}"))  # fmt: skip
    order = ranked(r.scores)[:top]
    g.paged("outliers", "Outliers", [Section(f"the {len(order)} most unusual images", [Tile(int(i), f"score {r.scores[i]:.3f}") for i in order])])  # fmt: skip
    c = r.clusters
    sizes = np.bincount(c.labels, minlength=c.k)
    central = np.flatnonzero(c.rank < CLUSTER_SHOWN)
    central = central[np.lexsort((c.rank[central], c.labels[central]))]
    by_cluster: dict[int, list[Tile]] = {}
    for row in central.tolist():
        by_cluster.setdefault(int(c.labels[row]), []).append(Tile(row, f"cosine {c.similarity[row]:.3f}"))  # fmt: skip
    clusters = [
        Section(f"cluster {k} ({sizes[k]} images, most central first)", by_cluster.get(k, []))
        for k in np.argsort(-sizes, kind="stable").tolist()
    ]
    g.paged("clusters", "Clusters", clusters, html.escape(c.how))
    picked = [] if r.selection is None else r.selection.tolist()
    g.paged("selection", "Selection", [Section(f"{len(picked)} images that cover the collection", [Tile(int(i), f"#{j + 1}") for j, i in enumerate(picked)])])  # fmt: skip
    g.neighbour_pages()
    failed = g.thumbnails()
    counts = {
        "images": len(r.paths),
        "exact-groups": len(r.exact),
        "exact-files": sum(map(len, r.exact)),
        "near-groups": len(r.near),
        "near-images": sum(len(x.members) for x in r.near),
        "outliers-shown": len(order),
        "clusters": c.k,
        "selected": len(picked),
    }
    rows = "".join(f"<tr><th>{k}</th><td id='n-{k}'>{v}</td></tr>" for k, v in counts.items())
    g.page("index.html", "Collection summary", f"<table>{rows}</table><p>{html.escape(r.threshold_how)}</p>")  # fmt: skip
    return failed
