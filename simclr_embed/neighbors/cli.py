"""``simclr neighbors``: nearest neighbours, near-duplicates and a contact sheet of an embedded
collection (what ``simclr embed`` wrote).

    simclr neighbors --embeddings out.npy --output nn/                 # nn/neighbors.parquet
    simclr neighbors --embeddings out.npy --duplicates --png dups.png  # + nn/duplicates.tsv
    simclr neighbors --embeddings out.npy --query new.jpg --model model.onnx

Without ``--query``: every image's ``--k`` nearest others → ``DIR/neighbors.parquet``
(``path``, ``neighbors`` — paths, nearest first — ``similarities``). ``--duplicates
[THRESHOLD]``: groups of near-copies (cosine ≥ THRESHOLD along the neighbour graph) →
``DIR/duplicates.tsv``. ``--query IMG...``: embed those images with the collection's model (a
server or the .onnx; a different model version is refused) → their matches, printed and in
``DIR/queries.parquet``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_path, atomic_write_text
from simclr_embed.neighbors.collection import Collection, load_collection
from simclr_embed.neighbors.search import (
    INDEXES,
    Group,
    Neighbors,
    build_index,
    choose_index,
    duplicate_groups,
    nearest_in,
    normalized,
    search,
)
from simclr_embed.neighbors.sheet import Cell, draw_sheet, save_png
from simclr_embed.server.config import TOKEN_ENV

# The highest cosine at which no real photo was paired with a different one (400 CIFAR-10 photos,
# cpu-quick model, features) while every JPEG-q50 and PNG copy and 97.5 % of the 5 %-crops were
# still found (bench/neighbors.py, docs/benchmarks.md "Neighbours"). Precision first: a false
# merge hides a distinct image, and the nearest *other* picture only gets closer as N grows.
DEFAULT_DUPLICATE = 0.98


@dataclass(frozen=True)
class NeighborsConfig:
    embeddings: Path
    output: Path
    k: int = 10
    duplicates: float | None = None
    queries: tuple[Path, ...] = ()
    target: str | None = None
    model: Path | None = None
    device: str = "auto"
    index: str = "auto"
    png: Path | None = None
    png_rows: int = 8
    token: str | None = None
    tls: bool | Path = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simclr neighbors",
        description=" ".join(__doc__.split("\n\n")[0].split()).replace("``", ""),
        epilog="Exit codes: 0 done, 1 runtime failure (nothing written), 2 bad usage.",
    )
    p.add_argument("--embeddings", type=Path, required=True, metavar="OUT", help="what simclr embed wrote: an .npy (with OUT.paths.txt) or a Parquet folder")  # fmt: skip
    p.add_argument("--k", type=int, default=10, help="neighbours per image [10]")
    p.add_argument("--output", type=Path, default=None, metavar="DIR", help="where to write [OUT.neighbors/]")  # fmt: skip
    p.add_argument("--duplicates", type=float, nargs="?", const=DEFAULT_DUPLICATE, default=None, metavar="THRESHOLD",
                   help=f"group near-copies: cosine >= THRESHOLD [{DEFAULT_DUPLICATE}] → DIR/duplicates.tsv")  # fmt: skip
    p.add_argument("--query", type=Path, nargs="+", default=(), metavar="IMG", help="find the matches of these images (files or folders)")  # fmt: skip
    where = p.add_mutually_exclusive_group()
    where.add_argument("--target", help="--query: embed through this server (HOST:PORT)")
    where.add_argument("--model", type=Path, help="--query: embed in this process with this .onnx")  # fmt: skip
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="--model: where it runs [auto]")  # fmt: skip
    p.add_argument("--index", choices=INDEXES, default="auto",
                   help="exact (IndexFlatIP) or hnsw (IndexHNSWFlat); auto: exact up to 100,000 vectors or on a GPU [auto]")  # fmt: skip
    p.add_argument("--png", type=Path, default=None, metavar="FILE", help="draw a contact sheet: queries (or sampled images) with their neighbours, then duplicate groups")  # fmt: skip
    p.add_argument("--png-rows", type=int, default=8, help="sampled images / groups drawn [8]")
    p.add_argument("--token", default=None, help=f"--target: bearer token [env {TOKEN_ENV}]")
    p.add_argument("--tls", action="store_true", help="--target: connect with TLS")
    p.add_argument("--tls-ca", type=Path, default=None, help="--target: PEM root CA (implies --tls)")  # fmt: skip
    return p


def parse_config(argv: Sequence[str] | None) -> NeighborsConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.k < 1 or args.png_rows < 1:
        parser.error("--k and --png-rows must be >= 1")
    if args.duplicates is not None and not -1.0 <= args.duplicates <= 1.0:
        parser.error(f"--duplicates is a cosine similarity in [-1, 1], got {args.duplicates}")
    if args.query and args.target is None and args.model is None:
        parser.error("--query needs --target (a server) or --model (an .onnx) to embed with")
    if not args.query and (args.target or args.model):
        parser.error("--target/--model embed the --query images; give --query IMG...")
    out = args.embeddings
    return NeighborsConfig(
        embeddings=out,
        output=args.output or out.with_name(out.name.rstrip("/") + ".neighbors"),
        k=args.k,
        duplicates=args.duplicates,
        queries=tuple(args.query),
        target=args.target,
        model=args.model,
        device=args.device,
        index=args.index,
        png=args.png,
        png_rows=args.png_rows,
        token=args.token if args.token is not None else os.environ.get(TOKEN_ENV),
        tls=args.tls_ca if args.tls_ca is not None else args.tls,
    )


def write_table(path: Path, rows: Sequence[str], found: Neighbors, paths: Sequence[str]) -> None:
    """``path``, ``neighbors`` (k paths, nearest first), ``similarities`` (k float32)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    k = found.indices.shape[1]
    names = pa.array(paths, pa.string()).take(pa.array(found.indices.ravel()))
    table = pa.table(
        {
            "path": pa.array(rows, pa.string()),
            "neighbors": pa.FixedSizeListArray.from_arrays(names, k),
            "similarities": pa.FixedSizeListArray.from_arrays(
                pa.array(found.similarities.ravel().astype(np.float32)), k
            ),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_groups(path: Path, groups: Sequence[Group], paths: Sequence[str]) -> None:
    lines = ["group\tpath\tsimilarity\n"]
    for g, group in enumerate(groups):
        lines += [
            f"{g}\t{paths[int(m)]}\t{s:.4f}\n"
            for m, s in zip(group.members, group.similarities, strict=True)
        ]
    atomic_write_text(path, "".join(lines))


def embed_queries(cfg: NeighborsConfig, coll: Collection) -> tuple[list[str], np.ndarray]:
    """The query images' vectors ``[Q, D]``, made like the collection's; unusable ones skipped."""
    from simclr_embed.embed.cli import open_engine
    from simclr_embed.embed.job import check_paths, iter_inputs

    check_paths(cfg.queries)
    inputs = [str(p) for p in iter_inputs(cfg.queries)]
    engine = open_engine(
        cfg.target, cfg.model, device=cfg.device, token=cfg.token, tls=cfg.tls, wait_s=30.0
    )
    try:
        version = engine.model_info()["model_version"]
        if coll.model_version is None:
            print(f"warning: {cfg.embeddings} records no model version; cannot check that the queries use the same model", file=sys.stderr)  # fmt: skip
        elif version != coll.model_version:
            raise SimclrError(f"the queries' model is version {version}, the embeddings were made with {coll.model_version}; embed both with one model")  # fmt: skip
        kind = coll.job.get("kind", "features")
        normalize = bool(coll.job.get("normalize", False))
        names, vectors = [], []
        for batch in engine.embed_iter(inputs, kind, normalize, on_error="skip"):
            if batch.model_version and batch.model_version != version:  # a redeploy mid-way
                raise SimclrError(f"the server now serves model {batch.model_version}, not {version}; the queries must all be embedded by the collection's model")  # fmt: skip
            for failure in batch.failures:
                print(f"skipped {inputs[failure.index]}: {failure.reason}", file=sys.stderr)
            names += [inputs[int(i)] for i in batch.indices]
            vectors.append(batch.vectors)
    finally:
        engine.close()
    if not names:
        raise SimclrError("none of the --query images could be used")
    matrix = np.concatenate(vectors)
    if matrix.shape[1] != coll.vectors.shape[1]:
        raise SimclrError(f"query vectors have D = {matrix.shape[1]}, the collection's D = {coll.vectors.shape[1]}")  # fmt: skip
    return names, matrix


def _rows(
    heads: Sequence[str], found: Neighbors, paths: Sequence[str], label: Callable[[str], str]
) -> list[list[Cell]]:
    """One sheet row per head image: it, then its neighbours with their similarities."""
    return [
        [Cell(head, label(head))]
        + [Cell(paths[int(j)], f"{s:.3f}") for j, s in zip(idx, sims, strict=True)]
        for head, idx, sims in zip(heads, found.indices, found.similarities, strict=True)
    ]


def _group_rows(groups: Sequence[Group], paths: Sequence[str], width: int) -> list[list[Cell]]:
    """One sheet row per group: its first image, then (up to the width) the other members."""
    rows = []
    for g, group in enumerate(groups):
        row = [Cell(paths[int(group.members[0])], f"group {g} ({len(group.members)})")]
        for m, s in zip(group.members[1:width], group.similarities[1:width], strict=True):
            row.append(Cell(paths[int(m)], f"{s:.3f}"))
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv)
    coll = load_collection(cfg.embeddings)
    n, paths = len(coll.vectors), coll.paths
    if cfg.k >= n:
        raise SimclrError(f"--k {cfg.k} needs at least {cfg.k + 1} images; {cfg.embeddings} has {n}")  # fmt: skip
    index_kind = choose_index(n, cfg.index)
    query_names: list[str] = []
    if cfg.queries:  # embedded first: a refused model version costs no index build
        query_names, query_vectors = embed_queries(cfg, coll)
    cfg.output.mkdir(parents=True, exist_ok=True)
    sheet_rows: list[list[Cell]] = []
    found: Neighbors | None = None
    unit = normalized(coll.vectors)  # [N, D]: one copy and one index serve every search below
    index = build_index(unit, index_kind)
    if not cfg.queries or cfg.duplicates is not None:
        found = nearest_in(index, unit, cfg.k)
        if not cfg.queries:
            write_table(cfg.output / "neighbors.parquet", paths, found, paths)
            picks = np.unique(np.linspace(0, n - 1, min(cfg.png_rows, n)).round().astype(int))
            sub = Neighbors(found.indices[picks], found.similarities[picks])
            sheet_rows += _rows([paths[i] for i in picks], sub, paths, lambda p: Path(p).stem)
    if cfg.queries:
        matches = search(index, normalized(query_vectors), cfg.k)
        write_table(cfg.output / "queries.parquet", query_names, matches, paths)
        for name, idx, sims in zip(query_names, matches.indices, matches.similarities, strict=True):
            print(f"query {name}")
            for rank, (j, s) in enumerate(zip(idx, sims, strict=True), 1):
                print(f"  {rank:3d}  {s:.4f}  {paths[int(j)]}")
        sheet_rows += _rows(query_names, matches, paths, lambda p: f"query: {Path(p).name}")
    print(f"{n} images, D = {coll.vectors.shape[1]}, {index_kind} index, k = {cfg.k} → {cfg.output}")  # fmt: skip
    if cfg.duplicates is not None and found is not None:
        groups = duplicate_groups(coll.vectors, found, cfg.duplicates)
        write_groups(cfg.output / "duplicates.tsv", groups, paths)
        images = sum(len(g.members) for g in groups)
        print(f"near-duplicates (cosine >= {cfg.duplicates:g}): {len(groups)} groups, {images} images → {cfg.output / 'duplicates.tsv'}")  # fmt: skip
        sheet_rows += _group_rows(groups[: cfg.png_rows], paths, cfg.k + 1)
    if cfg.png is not None:
        save_png(draw_sheet(sheet_rows, cfg.k + 1), cfg.png)
        print(f"contact sheet ({len(sheet_rows)} rows) → {cfg.png}")
    return 0
