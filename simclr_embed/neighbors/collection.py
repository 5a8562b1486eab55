"""Read what ``simclr embed`` wrote: the vectors, their paths and the job that made them.

Two layouts (``server/embed_store.py`` writes both):

- ``x.npy`` float32 ``[N, D]`` + ``x.npy.paths.txt`` (row i ↔ line i) + ``x.npy.json`` (model
  version, kind, normalization, dimension; absent in files written by hand);
- a folder of Parquet parts (``path``, ``embedding`` fixed-size list of float32) with the job in
  ``_simclr_job.json`` and in each part's schema metadata (``simclr.*`` keys).

Everything is checked before anything is computed, so a bad input costs nothing and writes
nothing: a missing or short path list, a ragged dimension, an unfinished job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simclr_embed.errors import SimclrError

PATHS_SUFFIX = ".paths.txt"
JOB_FILE = "_simclr_job.json"  # simclr_embed.embed.store.ParquetStore.job_name


@dataclass(frozen=True)
class Collection:
    """An embedded collection: ``vectors`` ``[N, D]`` (as written, not normalized), ``paths``
    (N strings, row order) and the job record (``{}`` when none was written)."""

    vectors: np.ndarray
    paths: list[str]
    job: dict[str, Any]

    @property
    def model_version(self) -> str | None:
        return self.job.get("model_version")


def load_collection(out: Path) -> Collection:
    """``out`` as written by ``simclr embed`` (an ``.npy`` file or a Parquet folder)."""
    if out.is_dir():
        return _load_parquet(out)
    if not out.exists():
        raise SimclrError(f"--embeddings {out}: no such file or folder")
    return _load_npy(out)


def _load_npy(out: Path) -> Collection:
    listing = out.with_name(out.name + PATHS_SUFFIX)
    if not listing.is_file():
        raise SimclrError(f"{out}: its path list {listing.name} is missing (simclr embed writes both)")  # fmt: skip
    try:
        vectors = np.load(out, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise SimclrError(f"{out}: not a readable .npy file ({exc})") from None
    paths = listing.read_text(encoding="utf-8").splitlines()
    job: dict[str, Any] = {}
    meta = out.with_name(out.name + ".json")
    if meta.is_file():
        job = json.loads(meta.read_text())
    return _checked(out, vectors, paths, job)


def _load_parquet(out: Path) -> Collection:
    try:
        import pyarrow.dataset as ds
    except ImportError:
        raise SimclrError("reading Parquet embeddings needs pyarrow: pip install 'simclr-embed[neighbors]'") from None  # fmt: skip
    job_file = out / JOB_FILE
    job: dict[str, Any] = json.loads(job_file.read_text()) if job_file.is_file() else {}
    if job and not job.get("complete"):
        raise SimclrError(f"{out}: the embedding job is not finished (run simclr embed --resume)")
    try:
        dataset = ds.dataset(out, format="parquet")  # skips the _simclr_* and .part files
        table = dataset.to_table(columns=["path", "embedding"])
    except Exception as exc:  # pyarrow raises several types for a bad or foreign folder
        raise SimclrError(f"{out}: not a folder of embedding Parquet files ({exc})") from None
    if not job:
        schema_meta = dataset.schema.metadata or {}
        job = {
            k.decode()[len("simclr.") :]: json.loads(v)
            for k, v in schema_meta.items()
            if k.startswith(b"simclr.")
        }
    column = table.column("embedding").combine_chunks()
    width = getattr(column.type, "list_size", None)
    if width is None:
        raise SimclrError(f"{out}: column 'embedding' is not a fixed-size list of floats")
    flat = column.flatten().to_numpy(zero_copy_only=False)
    vectors = flat.astype(np.float32, copy=False).reshape(len(table), width)
    return _checked(out, vectors, table.column("path").to_pylist(), job)


def _checked(out: Path, vectors: np.ndarray, paths: list[str], job: dict[str, Any]) -> Collection:
    if vectors.ndim != 2 or vectors.shape[1] < 1:
        raise SimclrError(f"{out}: expected vectors [N, D], got shape {list(vectors.shape)}")
    if len(paths) != len(vectors):
        raise SimclrError(f"{out}: {len(vectors)} vectors but {len(paths)} paths; the files do not belong together")  # fmt: skip
    want = job.get("dimension")
    if want is not None and int(want) != vectors.shape[1]:
        raise SimclrError(f"{out}: vectors have D = {vectors.shape[1]}, the job record says {want}")  # fmt: skip
    if len(vectors) == 0:
        raise SimclrError(f"{out}: no vectors")
    return Collection(vectors, paths, job)
