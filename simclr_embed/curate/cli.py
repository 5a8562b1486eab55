"""``simclr curate``: clean and understand an embedded collection (what ``simclr embed`` wrote).

    simclr curate --embeddings out.npy --model model.onnx --select 1000 --html

Writes into DIR (default ``OUT.curate/``): ``exact_duplicates.tsv`` (byte-identical files),
``duplicates.tsv`` (near-duplicate groups in which every pair is a near-duplicate; with
--model/--target and no THRESHOLD the threshold is calibrated on the collection),
``outliers.tsv`` (every image, most unusual first), ``clusters.parquet`` (spherical k-means,
each cluster's most central images ranked first), ``selection.txt`` (--select N: images that
cover the collection, the set to label first) and with --html a static gallery
``DIR/index.html``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simclr_embed.curate import calibrate, clusters, exact, near, outliers, selection
from simclr_embed.curate.report import Results, write_gallery, write_tables
from simclr_embed.errors import SimclrError
from simclr_embed.neighbors.cli import DEFAULT_DUPLICATE
from simclr_embed.neighbors.collection import Collection, load_collection
from simclr_embed.neighbors.search import build_index, nearest_in, normalized
from simclr_embed.server.config import TOKEN_ENV

K = 10  # neighbours per image: outlier scores, duplicate candidates, the gallery's links
CALIBRATION_SAMPLE = 200  # images copied and embedded: the positives
NEGATIVE_SAMPLE = 2000  # images whose nearest other image is a negative (no embedding needed)
OUTPUTS = ("exact_duplicates.tsv", "duplicates.tsv", "outliers.tsv", "clusters.parquet")


@dataclass(frozen=True)
class CurateConfig:
    embeddings: Path
    output: Path
    model: Path | None = None
    target: str | None = None
    duplicates: float | None = None
    outliers: int = 100
    outlier_score: str = "knn"
    clusters: int | None = None  # None: auto
    select: int | None = None
    html: bool = False
    overwrite: bool = False
    device: str = "auto"
    token: str | None = None
    tls: bool | Path = False
    seed: int = 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simclr curate",
        description=" ".join(__doc__.split("\n\n")[0].split()).replace("``", ""),
        epilog="Exit codes: 0 done, 1 runtime failure (nothing written), 2 bad usage.",
    )
    p.add_argument("--embeddings", type=Path, required=True, metavar="OUT", help="what simclr embed wrote: an .npy (with OUT.paths.txt) or a Parquet folder")  # fmt: skip
    p.add_argument("--output", type=Path, default=None, metavar="DIR", help="where to write [OUT.curate/]")  # fmt: skip
    where = p.add_mutually_exclusive_group()
    where.add_argument("--model", type=Path, help="the collection's .onnx: calibrates the near-duplicate threshold in this process")  # fmt: skip
    where.add_argument("--target", help="a server with the collection's model (HOST:PORT): calibrates through it")  # fmt: skip
    p.add_argument("--duplicates", type=float, default=None, metavar="THRESHOLD", help=f"near-duplicate cosine threshold [calibrated with --model/--target, else {DEFAULT_DUPLICATE}]")  # fmt: skip
    p.add_argument("--outliers", type=int, default=100, metavar="N", help="outliers shown and printed (outliers.tsv lists every image) [100]")  # fmt: skip
    p.add_argument("--outlier-score", choices=("knn", "mean"), default="knn", help="knn: distance to the nearest images; mean: distance to the collection's mean direction [knn]")  # fmt: skip
    p.add_argument("--clusters", default="auto", metavar="K|auto", help="k-means clusters; auto: chosen by silhouette [auto]")  # fmt: skip
    p.add_argument("--select", type=int, default=None, metavar="N", help="N images that cover the collection → DIR/selection.txt")  # fmt: skip
    p.add_argument("--html", action="store_true", help="a static gallery in DIR/index.html")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in DIR")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="--model: where it runs [auto]")  # fmt: skip
    p.add_argument("--token", default=None, help=f"--target: bearer token [env {TOKEN_ENV}]")
    p.add_argument("--tls", action="store_true", help="--target: connect with TLS")
    p.add_argument("--tls-ca", type=Path, default=None, help="--target: PEM root CA (implies --tls)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="calibration sample and k-means [0]")
    return p


def parse_config(argv: Sequence[str] | None) -> CurateConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.duplicates is not None and not -1.0 <= args.duplicates <= 1.0:
        parser.error(f"--duplicates is a cosine similarity in [-1, 1], got {args.duplicates}")
    if args.outliers < 0 or (args.select is not None and args.select < 1):
        parser.error("--outliers must be >= 0 and --select >= 1")
    k = None
    if args.clusters != "auto":
        if not args.clusters.isdigit() or int(args.clusters) < 1:
            parser.error(f"--clusters must be a positive integer or auto, got {args.clusters!r}")
        k = int(args.clusters)
    out = args.embeddings
    return CurateConfig(
        embeddings=out,
        output=args.output or out.with_name(out.name.rstrip("/") + ".curate"),
        model=args.model,
        target=args.target,
        duplicates=args.duplicates,
        outliers=args.outliers,
        outlier_score=args.outlier_score,
        clusters=k,
        select=args.select,
        html=args.html,
        overwrite=args.overwrite,
        device=args.device,
        token=args.token if args.token is not None else os.environ.get(TOKEN_ENV),
        tls=args.tls_ca if args.tls_ca is not None else args.tls,
        seed=args.seed,
    )


def check(cfg: CurateConfig, coll: Collection) -> None:
    """Everything that can fail, before any work."""
    n = len(coll.vectors)
    if n <= K:
        raise SimclrError(f"{cfg.embeddings} has {n} images; curating needs more than {K}")
    gone = exact.missing_files(coll.paths)
    if gone:
        raise SimclrError(
            f"{len(gone)} of the {n} files in {cfg.embeddings} are gone (first: {gone[0]}); "
            "run simclr embed --update to bring the embeddings up to date"
        )
    taken = [
        name for name in (*OUTPUTS, "selection.txt", "index.html") if (cfg.output / name).exists()
    ]
    if taken and not cfg.overwrite:
        raise SimclrError(
            f"{cfg.output} already holds results ({', '.join(taken)}); pass --overwrite to "
            "replace them, or choose another --output"
        )


class Stages:
    """One line per stage with its time (stderr), and a bar for long ones on a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def run(self, name: str, fn, *args, total: int | None = None, **kwargs):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        bar = None
        if self.tty and total:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=name, unit="img", leave=False, file=sys.stderr)
            kwargs["progress"] = lambda done: bar.update(done - bar.n)
        try:
            result = fn(*args, **kwargs)
        finally:
            if bar is not None:
                bar.close()
        print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return result


def negatives(
    coll: Collection, found: object, copy_of: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, int]:
    """Each sampled row's cosine to its nearest neighbour that is neither a byte copy nor the
    same picture (the collection's own near-duplicates are not negatives), and how many rows
    had a same-picture neighbour ahead of it."""
    indices, sims = found.indices[rows], found.similarities[rows]  # type: ignore[attr-defined]
    signatures: dict[int, np.ndarray | None] = {}

    def signature(row: int) -> np.ndarray | None:
        if row not in signatures:
            try:
                signatures[row] = calibrate.signature(Path(coll.paths[row]).read_bytes())
            except Exception:  # unreadable now: treated as a different picture
                signatures[row] = None
        return signatures[row]

    values, set_aside = [], 0
    for r, idx, sim in zip(rows, indices, sims, strict=True):
        skipped = False
        for j, s in zip(idx, sim, strict=True):
            if j < 0 or copy_of[j] == copy_of[r]:
                continue
            if calibrate.same_signature(signature(int(r)), signature(int(j))):
                skipped = True
                continue
            values.append(float(s))
            break
        set_aside += skipped
    return np.asarray(values, np.float32), set_aside


def calibrated(
    cfg: CurateConfig, coll: Collection, found: object, copy_of: np.ndarray
) -> calibrate.Calibration:
    """Embed synthetic copies of a sample with the collection's own model (version checked)."""
    from simclr_embed.embed.cli import open_engine

    engine = open_engine(
        cfg.target, cfg.model, device=cfg.device, token=cfg.token, tls=cfg.tls, wait_s=30.0
    )
    try:
        version = engine.model_info()["model_version"]
        if coll.model_version is not None and version != coll.model_version:
            raise SimclrError(
                f"the model is version {version}, {cfg.embeddings} was made with "
                f"{coll.model_version}; calibrate with the collection's own model"
            )
        kind = coll.job.get("kind", "features")
        normalize = bool(coll.job.get("normalize", False))

        def embed(items: list[bytes]) -> tuple[np.ndarray, list[int]]:
            vectors, used = [], []
            for batch in engine.embed_iter(items, kind, normalize, on_error="skip"):
                vectors.append(batch.vectors)
                used += [int(i) for i in batch.indices]
            if not used:
                raise SimclrError("none of the calibration copies could be embedded")
            return np.concatenate(vectors), used

        n = len(coll.paths)
        rng = np.random.default_rng(cfg.seed)
        rows = np.sort(rng.choice(n, min(n, CALIBRATION_SAMPLE), replace=False))
        files = [Path(coll.paths[r]).read_bytes() for r in rows]
        others = np.sort(rng.choice(n, min(n, NEGATIVE_SAMPLE), replace=False))
        nearest_other, set_aside = negatives(coll, found, copy_of, others)
        return calibrate.calibrate(embed, files, coll.vectors[rows], nearest_other, set_aside)
    finally:
        engine.close()


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv)
    coll = load_collection(cfg.embeddings)
    check(cfg, coll)
    n, paths = len(coll.vectors), coll.paths
    stages = Stages()
    cfg.output.mkdir(parents=True, exist_ok=True)
    unit = normalized(coll.vectors)  # [N, D]
    found = stages.run(f"{K} nearest neighbours of {n} images", lambda: nearest_in(build_index(unit), unit, K))  # fmt: skip
    exact_groups = stages.run("exact duplicates (file hashes)", exact.exact_groups, paths, total=n)
    copy_of = np.arange(n)
    for group in exact_groups:
        copy_of[group] = group[0]
    if cfg.duplicates is not None:
        threshold, how = cfg.duplicates, "given"
    elif cfg.model is not None or cfg.target is not None:
        cal = stages.run("threshold calibration", calibrated, cfg, coll, found, copy_of)
        threshold, how = cal.threshold, cal.describe()
        print(how)
    else:
        threshold = DEFAULT_DUPLICATE
        how = f"the fixed default {DEFAULT_DUPLICATE}"
        print(
            f"warning: near-duplicate threshold {DEFAULT_DUPLICATE} is a fixed default; it may "
            "not fit this model — give --model or --target to calibrate it on the collection",
            file=sys.stderr,
        )
    near_groups = stages.run("near-duplicate groups", near.near_groups, unit, found, threshold)
    if cfg.outlier_score == "mean":
        scores = stages.run("outlier scores", outliers.mean_direction_scores, unit)
    else:
        scores = stages.run("outlier scores", outliers.outlier_scores, found, copy_of)
    found_clusters = stages.run("clusters", clusters.cluster, unit, cfg.clusters, cfg.seed)
    print(f"clusters: {found_clusters.how}")
    picked = None
    if cfg.select is not None:
        picked = stages.run("selection", selection.select, unit, cfg.select, copy_of == np.arange(n), total=cfg.select)  # fmt: skip
    results = Results(paths, found, exact_groups, near_groups, threshold, how, scores, found_clusters, picked)  # fmt: skip
    write_tables(cfg.output, results)
    if cfg.html:
        failed = stages.run("gallery", write_gallery, cfg.output, results, cfg.outliers)
        if failed:
            print(f"warning: {failed} thumbnails could not be made (files unreadable now)", file=sys.stderr)  # fmt: skip
    print(results.summary(cfg.output, cfg.outliers))
    return 0
