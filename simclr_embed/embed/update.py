"""``simclr embed --update``: bring a finished OUTPUT up to date with its folders — embed only
files that are new or changed (by size or modification time), drop the rows of files that are
gone, keep every other row as it is; the old OUTPUT stays whole until the new one replaces it.

Which files are unchanged is read from the file record a finished job leaves beside its output
(``x.npy.files.npy`` / ``DIR/_simclr_files.npy``: each row's file size and ``st_mtime_ns`` when
the job ended). A file modified after the job started is recorded as unknown, so a change made
while it ran is picked up next time. An output without the record (written before it existed)
has every file re-embedded, with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from simclr_embed.embed.store import (
    ParquetStore,
    completed,
    embedding_table,
    errors_path,
    meta_path,
)
from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_write_text

STAT = np.dtype([("size", "<i8"), ("mtime_ns", "<i8")])
CHUNK = 65_536  # rows copied at a time: memory bounded in N


def record_path(output: Path, fmt: str) -> Path:
    return output / "_simclr_files.npy" if fmt == "parquet" else output.with_name(output.name + ".files.npy")  # fmt: skip


def file_stats(paths: Sequence[str], started_ns: int | None = None) -> np.ndarray:
    """``[N]`` (size, mtime_ns); (-1, -1) for a file gone or modified since ``started_ns``."""
    out = np.full(len(paths), -1, STAT)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if started_ns is None or st.st_mtime_ns < started_ns:
            out[i] = (st.st_size, st.st_mtime_ns)
    return out


def output_paths(output: Path, fmt: str) -> list[str]:
    if fmt == "npy":
        return output.with_name(output.name + ".paths.txt").read_text(encoding="utf-8").splitlines()
    import pyarrow.dataset as ds

    return (
        ds.dataset(output, format="parquet").to_table(columns=["path"]).column("path").to_pylist()
    )


def write_record(output: Path, fmt: str, started_ns: int) -> None:
    """The file record of a just-finished output (see the module docstring)."""
    stats = file_stats(output_paths(output, fmt), started_ns)
    target = record_path(output, fmt)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, stats, allow_pickle=False)
    os.replace(tmp, target)


def _vector_chunks(output: Path, fmt: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, vectors [m, D]) of a finished output, in row order, a chunk at a time."""
    if fmt == "npy":
        vectors = np.load(output, mmap_mode="r")
        for start in range(0, len(vectors), CHUNK):
            yield start, np.asarray(vectors[start : start + CHUNK])
        return
    import pyarrow.dataset as ds

    start = 0
    for batch in ds.dataset(output, format="parquet").to_batches(columns=["embedding"]):
        column = batch.column(0)
        flat = column.flatten().to_numpy(zero_copy_only=False)
        yield start, flat.astype(np.float32, copy=False).reshape(len(batch), -1)
        start += len(batch)


def plan(output: Path, fmt: str, inputs: Sequence[str], say: Callable[[str], None]) -> tuple[np.ndarray, list[str], int]:  # fmt: skip
    """(old rows to keep, as a bool mask; inputs to embed; rows dropped)."""
    old = output_paths(output, fmt)
    record = record_path(output, fmt)
    recorded = np.load(record) if record.exists() else None
    if recorded is None or len(recorded) != len(old):
        say(f"warning: {output} has no file record (written by an older simclr embed): every file is embedded again")  # fmt: skip
        recorded = np.full(len(old), -1, STAT)
    now = file_stats(inputs)
    current = {p: (int(s["size"]), int(s["mtime_ns"])) for p, s in zip(inputs, now, strict=True)}
    keep = np.array(
        [
            r["size"] >= 0 and current.get(p) == (int(r["size"]), int(r["mtime_ns"]))
            for p, r in zip(old, recorded, strict=True)
        ],
        bool,
    )
    kept = {p for p, k in zip(old, keep, strict=True) if k}
    todo = [p for p in inputs if p not in kept]
    return keep, todo, int((~keep).sum())


def merge(
    output: Path, fmt: str, keep: np.ndarray, new: Path | None, job: dict[str, Any], started_ns: int
) -> tuple[int, int]:
    """Kept rows of ``output`` then the rows of ``new`` (a finished output of the same job) →
    the new ``output``, swapped in at the end. Returns (rows, skipped)."""
    old_paths = output_paths(output, fmt)
    new_paths = output_paths(new, fmt) if new is not None else []
    paths = [p for p, k in zip(old_paths, keep, strict=True) if k] + new_paths
    rows, dim = len(paths), int(job["dimension"])
    skipped = 0
    if new is not None and errors_path(new).exists():
        skipped = len(errors_path(new).read_text().splitlines())
    stage = output.with_name(f".{output.name}.merged")
    sources = [(output, keep)] + ([(new, None)] if new is not None else [])
    if fmt == "npy":
        stage.unlink(missing_ok=True)
        out = npy_format.open_memmap(stage, mode="w+", dtype="<f4", shape=(rows, dim))
        at = 0
        for src, mask in sources:
            for start, chunk in _vector_chunks(src, fmt):
                part = chunk if mask is None else chunk[mask[start : start + len(chunk)]]
                out[at : at + len(part)] = part
                at += len(part)
        out.flush()
        del out
        atomic_write_text(output.with_name(output.name + ".paths.txt"), "".join(f"{p}\n" for p in paths))  # fmt: skip
        atomic_write_text(meta_path(output), json.dumps({**job, "complete": True, "rows": rows, "skipped": skipped}, indent=2) + "\n")  # fmt: skip
        _move_errors(new, output)
        os.replace(stage, output)  # last, as a fresh job does
    else:
        import pyarrow.parquet as pq

        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir()
        at, part = 0, 0
        for src, mask in sources:
            for start, chunk in _vector_chunks(src, fmt):
                vectors = chunk if mask is None else chunk[mask[start : start + len(chunk)]]
                if len(vectors):
                    pq.write_table(embedding_table(paths[at : at + len(vectors)], vectors, job), stage / f"part-{part:06d}.parquet")  # fmt: skip
                    at, part = at + len(vectors), part + 1
        record = {**job, "complete": True, "rows": rows, "skipped": skipped, "parts": part}
        atomic_write_text(stage / ParquetStore.job_name, json.dumps(record, indent=2) + "\n")
        _move_errors(new, stage)
        old = output.with_name(f".{output.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(output, old)
        os.replace(stage, output)
        if errors_path(stage).exists():
            os.replace(errors_path(stage), errors_path(output))
        else:
            errors_path(output).unlink(missing_ok=True)
        shutil.rmtree(old)
    write_record(output, fmt, started_ns)
    return rows, skipped


def _move_errors(new: Path | None, output: Path) -> None:
    if new is not None and errors_path(new).exists():
        os.replace(errors_path(new), errors_path(output))
    else:
        errors_path(output).unlink(missing_ok=True)


def finished_job(output: Path, fmt: str) -> dict[str, Any]:
    job = completed(output, fmt)
    if job is None:
        raise SimclrError(
            f"--update: {output} is not a finished simclr embed output (run without --update to "
            "make it, or --resume to finish an interrupted run)"
        )
    return job


def remove_output(output: Path, fmt: str) -> None:
    """A staging output of the update, gone once merged."""
    if fmt == "parquet":
        shutil.rmtree(output, ignore_errors=True)
    else:
        for suffix in ("", ".paths.txt", ".json", ".files.npy", ".errors.tsv"):
            output.with_name(output.name + suffix).unlink(missing_ok=True)
