"""Where a bulk embedding job writes: as it goes, in committed parts, resumable after a kill.

``npy`` (OUTPUT ``x.npy``): while running, ``x.npy.partial/`` holds ``vectors.npy`` (the final
file, growing: numpy's header for ``[0, D]`` — numpy leaves room in it for the shape to grow —
then raw float32 rows), ``paths.txt``, ``errors.tsv``, ``job.json`` and ``journal.jsonl``.
A part (``part_size`` inputs) is flushed and fsynced, then one journal line records the three
files' sizes and how many inputs are done: that line is the commit. On resume everything past
the last complete line is cut off, so a half-written part is never read back. At the end the
header gets the real row count (same length) and the files are renamed to ``x.npy``,
``x.npy.paths.txt`` and ``x.npy.errors.tsv`` (``x.npy`` last) — byte for byte what
``np.save`` writes, interrupted or not; ``x.npy.json`` records the model version, kind,
normalization, dimension and counts (what ``simclr neighbors`` checks queries against).

``parquet`` (OUTPUT a folder): one ``part-NNNNNN.parquet`` per part (columns ``path`` and
``embedding``, a fixed-size list of float32; model version, kind, normalization and dimension
in the schema metadata), each written under a dot-name, fsynced and renamed before its journal
line; ``_simclr_job.json`` and ``_simclr_journal.jsonl`` beside them (pyarrow.dataset, Spark
and Ray skip names starting with ``.`` or ``_``); errors go to ``OUTPUT.errors.tsv``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_write_text

FORMATS = ("npy", "parquet")
JOB_KEYS = ("format", "model_version", "kind", "normalize", "dimension")


@dataclass
class Progress:
    """What is committed: inputs done, rows (vectors) and errors written, the last input."""

    inputs: int = 0
    rows: int = 0
    errors: int = 0
    last: str | None = None


def _fsync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _one_line(text: str) -> str:
    return " ".join(str(text).split())  # no tabs or newlines: TSV-safe


def read_journal(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete journal lines and the byte length they span (a torn last line — a kill
    mid-write — is not a commit)."""
    entries: list[dict[str, Any]] = []
    good = 0
    if path.exists():
        data = path.read_bytes()
        pos = 0
        while (end := data.find(b"\n", pos)) >= 0:
            try:
                entries.append(json.loads(data[pos:end]))
            except ValueError:
                break
            pos = good = end + 1
    return entries, good


def errors_path(output: Path) -> Path:
    return output.with_name(output.name + ".errors.tsv")


def meta_path(output: Path) -> Path:
    """``x.npy.json``: what made a finished ``x.npy`` (model version, kind, dimension, rows)."""
    return output.with_name(output.name + ".json")


class Store:
    """One job's output. ``add`` rows, ``fail`` inputs, ``commit`` a part, ``finish``."""

    job_name = "job.json"
    journal_name = "journal.jsonl"

    def __init__(self, output: Path, state: Path, job: dict[str, Any], resume: bool) -> None:
        self.output, self.state, self.job = output, state, job
        self.journal = state / self.journal_name
        self.progress = Progress()
        self._errors_pending: list[str] = []
        entry: dict[str, Any] | None = None
        if resume and (state / self.job_name).exists():
            self._check_same_job(json.loads((state / self.job_name).read_text()))
            entries, good = read_journal(self.journal)
            with open(self.journal, "a+b") as f:  # drop a torn line after the last commit
                f.truncate(good)
            if entries:
                entry = entries[-1]
                self.progress = Progress(
                    entry["inputs"], entry["rows"], entry["errors"], entry["last"]
                )
        else:
            if state.exists():
                shutil.rmtree(state) if state.is_dir() else state.unlink()
            state.mkdir(parents=True)
            atomic_write_text(state / self.job_name, json.dumps(job, indent=2) + "\n")
        self._open(entry)

    def _check_same_job(self, old: dict[str, Any]) -> None:
        changed = [k for k in JOB_KEYS if old.get(k) != self.job.get(k)]
        if changed:
            was = ", ".join(f"{k}={old.get(k)!r}" for k in changed)
            now = ", ".join(f"{k}={self.job.get(k)!r}" for k in changed)
            hint = (
                f"serve model {old.get('model_version')} again to continue it, or "
                if "model_version" in changed
                else ""
            )
            raise SimclrError(
                f"--resume: {self.output} was started with {was}, this run has {now}; nothing "
                f"was changed ({hint}use --overwrite to start over)"
            )

    def fail(self, path: str, reason: str) -> None:
        self._errors_pending.append(f"{path}\t{_one_line(reason)}\n")

    def commit(self, inputs: int, last: str) -> None:
        """Make everything added so far durable as one part; the journal line is the commit."""
        sizes = self._flush_part()
        self.progress.inputs, self.progress.last = inputs, last
        with open(self.journal, "a") as f:
            f.write(json.dumps({**vars(self.progress), **sizes}, sort_keys=True) + "\n")
            _fsync(f)

    def _record(self) -> dict[str, Any]:
        return {"complete": True, "rows": self.progress.rows, "skipped": self.progress.errors}

    def _open(self, entry: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def add(self, paths: Sequence[str], vectors: np.ndarray) -> None:
        raise NotImplementedError

    def _flush_part(self) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class NpyStore(Store):
    """``OUTPUT`` (.npy) + ``OUTPUT.paths.txt`` + ``OUTPUT.errors.tsv``, built in
    ``OUTPUT.partial/``."""

    def __init__(self, output: Path, job: dict[str, Any], resume: bool) -> None:
        if output.is_dir():
            raise SimclrError(f"--output {output}: is a folder (--format npy writes a file)")
        super().__init__(output, output.with_name(output.name + ".partial"), job, resume)

    def _header(self, rows: int) -> bytes:
        buf = io.BytesIO()
        shape = (rows, int(self.job["dimension"]))
        npy_format.write_array_header_1_0(
            buf, {"descr": "<f4", "fortran_order": False, "shape": shape}
        )
        return buf.getvalue()

    def _open(self, entry: dict[str, Any] | None) -> None:
        files = self.vectors, self.paths, self.errors = (
            self.state / "vectors.npy",
            self.state / "paths.txt",
            self.state / "errors.tsv",
        )
        if entry is None:  # nothing committed yet: (re)start the files
            self.vectors.write_bytes(self._header(0))
            self.paths.write_bytes(b"")
            self.errors.write_bytes(b"")
        else:  # cut off whatever an interrupted part left past the last commit
            for file, key in zip(
                files, ("vectors_bytes", "paths_bytes", "errors_bytes"), strict=True
            ):
                with open(file, "r+b") as f:
                    f.truncate(entry[key])
        self._vec = open(self.vectors, "ab")  # noqa: SIM115 (closed in finish)
        self._paths = open(self.paths, "ab")  # noqa: SIM115
        self._errs = open(self.errors, "ab")  # noqa: SIM115

    def add(self, paths: Sequence[str], vectors: np.ndarray) -> None:
        self._vec.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        self._paths.write("".join(f"{p}\n" for p in paths).encode())
        self.progress.rows += len(paths)

    def _flush_part(self) -> dict[str, Any]:
        self._errs.write("".join(self._errors_pending).encode())
        self.progress.errors += len(self._errors_pending)
        self._errors_pending.clear()
        for f in (self._vec, self._paths, self._errs):
            _fsync(f)
        return {
            "vectors_bytes": self._vec.tell(),
            "paths_bytes": self._paths.tell(),
            "errors_bytes": self._errs.tell(),
        }

    def finish(self) -> None:
        for f in (self._vec, self._paths, self._errs):
            f.close()
        header = self._header(self.progress.rows)
        if len(header) != len(self._header(0)):  # numpy reserves the room; never expected
            raise SimclrError(f"cannot grow the .npy header to {self.progress.rows} rows")
        with open(self.vectors, "r+b") as f:
            f.write(header)
            _fsync(f)
        os.replace(self.paths, self.output.with_name(self.output.name + ".paths.txt"))
        if self.errors.stat().st_size:
            os.replace(self.errors, errors_path(self.output))
        else:  # a clean run leaves no stale list from an older run
            errors_path(self.output).unlink(missing_ok=True)
        record = {**self.job, **self._record()}
        atomic_write_text(meta_path(self.output), json.dumps(record, indent=2) + "\n")
        os.replace(self.vectors, self.output)  # last: its existence means the rest is in place
        shutil.rmtree(self.state)


class ParquetStore(Store):
    """A folder of Parquet parts; see the module docstring."""

    job_name = "_simclr_job.json"
    journal_name = "_simclr_journal.jsonl"

    def __init__(self, output: Path, job: dict[str, Any], resume: bool) -> None:
        self.check_output(output)
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise SimclrError(
                "--format parquet needs pyarrow: pip install 'simclr-embed[parquet]'"
            ) from None
        super().__init__(output, output, job, resume)

    @classmethod
    def check_output(cls, output: Path) -> None:
        """Refuse an OUTPUT that is a file, or a folder this tool did not write."""
        if output.suffix == ".npy":
            raise SimclrError(f"--format parquet writes a folder, not {output} (drop .npy)")
        if output.exists() and not output.is_dir():
            raise SimclrError(f"--output {output}: exists and is not a folder")
        ours = (output / cls.job_name).exists()
        if output.is_dir() and any(output.iterdir()) and not ours:
            # Never clear a folder this tool did not write (it may be the photos themselves).
            raise SimclrError(
                f"--output {output}: a non-empty folder that is not a simclr embed output; "
                "choose another --output"
            )

    def _part_name(self, index: int) -> Path:
        return self.output / f"part-{index:06d}.parquet"

    def _open(self, entry: dict[str, Any] | None) -> None:

        self.parts = entry["parts"] if entry else 0
        # Files a killed run left: temp files, and parts renamed but never journaled.
        for path in self.output.iterdir():
            stray = path.name.startswith(".part-")
            if path.name.startswith("part-") and path.suffix == ".parquet":
                stray = int(path.stem.split("-")[1]) >= self.parts
            if stray:
                path.unlink()
        self._errs_file = self.output / "_simclr_errors.tsv"
        if entry is None:
            self._errs_file.write_bytes(b"")
        else:
            with open(self._errs_file, "r+b") as f:
                f.truncate(entry["errors_bytes"])
        self._rows: list[tuple[Sequence[str], np.ndarray]] = []

    def add(self, paths: Sequence[str], vectors: np.ndarray) -> None:
        self._rows.append((list(paths), np.ascontiguousarray(vectors, np.float32)))
        self.progress.rows += len(paths)

    def _flush_part(self) -> dict[str, Any]:
        import pyarrow.parquet as pq

        if self._rows:
            paths = [p for chunk, _ in self._rows for p in chunk]
            table = embedding_table(paths, np.concatenate([v for _, v in self._rows]), self.job)
            final = self._part_name(self.parts)
            tmp = final.with_name("." + final.name + ".tmp")
            pq.write_table(table, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            self.parts += 1
            self._rows.clear()
        with open(self._errs_file, "ab") as f:
            f.write("".join(self._errors_pending).encode())
            _fsync(f)
            self.progress.errors += len(self._errors_pending)
            self._errors_pending.clear()
            size = f.tell()
        return {"parts": self.parts, "errors_bytes": size}

    def finish(self) -> None:
        if self._errs_file.stat().st_size:
            os.replace(self._errs_file, errors_path(self.output))
        else:
            self._errs_file.unlink()
            errors_path(self.output).unlink(missing_ok=True)
        job = {**self.job, **self._record(), "parts": self.parts}
        atomic_write_text(self.output / self.job_name, json.dumps(job, indent=2) + "\n")
        self.journal.unlink(missing_ok=True)


def embedding_table(paths: Sequence[str], vectors: np.ndarray, job: dict[str, Any]) -> Any:
    """``path`` string + ``embedding`` fixed-size list of float32 ``[D]``; the job (model version,
    kind, normalization, dimension) in the schema metadata as ``simclr.*`` JSON values."""
    import pyarrow as pa

    dim = int(job["dimension"])
    meta = {f"simclr.{k}": json.dumps(v) for k, v in job.items()}
    schema = pa.schema(
        [("path", pa.string()), ("embedding", pa.list_(pa.float32(), dim))], metadata=meta
    )
    flat = np.ascontiguousarray(vectors, np.float32).reshape(-1)  # [n·D]
    return pa.table(
        {
            "path": pa.array(list(paths), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat), dim),
        },
        schema=schema,
    )


def open_store(output: Path, fmt: str, job: dict[str, Any], resume: bool) -> Store:
    if fmt == "npy":
        return NpyStore(output, job, resume)
    if fmt == "parquet":
        return ParquetStore(output, job, resume)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def completed(output: Path, fmt: str) -> dict[str, Any] | None:
    """The job record of a finished output (``None`` when there is none)."""
    if fmt == "parquet":
        job_file = output / ParquetStore.job_name
        if job_file.exists():
            job = json.loads(job_file.read_text())
            return job if job.get("complete") else None
        return None
    meta = meta_path(output)
    if output.is_file() and meta.is_file():
        return json.loads(meta.read_text())
    return None


def state_dir(output: Path, fmt: str) -> Path:
    """Where an unfinished run keeps its job, journal and growing files."""
    return output if fmt == "parquet" else output.with_name(output.name + ".partial")


def held(output: Path, fmt: str) -> dict[str, Any] | None:
    """What an existing OUTPUT holds — ``{"complete", "rows", "inputs", "model_version", "kind"}``
    — or ``None`` when there is nothing there. An output this tool did not write counts too
    (``"foreign": True``): it is never replaced without being asked."""
    finished = completed(output, fmt)
    if finished is not None:
        return {"complete": True, "inputs": None, **finished}
    state = state_dir(output, fmt)
    job_file = state / (ParquetStore.job_name if fmt == "parquet" else Store.job_name)
    if job_file.is_file():
        job = json.loads(job_file.read_text())
        journal = state / (ParquetStore.journal_name if fmt == "parquet" else Store.journal_name)
        entries, _ = read_journal(journal) if journal.exists() else ([], 0)
        last = entries[-1] if entries else {"rows": 0, "inputs": 0}
        return {**job, "complete": False, "rows": last["rows"], "inputs": last["inputs"]}
    if fmt == "npy" and output.exists():
        return {"foreign": True}
    return None


def describe_held(record: dict[str, Any]) -> str:
    """One phrase for :func:`held`'s record: what would be lost by replacing it."""
    if record.get("foreign"):
        return "a file that simclr embed did not write"
    what = f"{record.get('rows', 0):,} rows of model {record.get('model_version')} ({record.get('kind')})"
    if record.get("complete"):
        return f"a finished embedding: {what}"
    return f"an unfinished run: {what} committed, {record.get('inputs', 0):,} inputs done"
