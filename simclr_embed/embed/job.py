"""A bulk embedding job: every image under some paths → vectors on disk, resumable.

    inputs (lazy, sorted walk) ─▶ engine.embed_iter (a server, or this process) ─▶ store

The engine is ``simclr_embed.client.EmbeddingClient`` (through ``simclr serve``: per-image errors,
gRPC's retry policy plus re-sends) or ``simclr_embed.embed.offline.OfflineEmbedder`` (the same
preprocessing and runtime in this process); both yield ``EmbedBatch`` in input order. The store
(``simclr_embed.embed.store``) commits a part every ``part_size`` inputs; ``resume`` skips the
committed inputs — after checking that the listing still agrees with them — and continues.
Memory holds what is in flight (``concurrency`` × ``batch`` images) and one part, never N.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from simclr_embed.client.codec import EmbedBatch
from simclr_embed.embed import update
from simclr_embed.embed.store import completed, describe_held, errors_path, held, open_store
from simclr_embed.errors import SimclrError
from simclr_embed.imageio import iter_images

log = logging.getLogger(__name__)


class Engine(Protocol):
    def model_info(self) -> dict[str, Any]: ...

    def embed_iter(
        self, images: Iterable[Any], kind: str, normalize: bool, *, on_error: str
    ) -> Iterator[EmbedBatch]: ...


@dataclass(frozen=True)
class JobConfig:
    paths: tuple[Path, ...]
    output: Path
    fmt: str = "npy"  # npy | parquet
    kind: str = "features"
    normalize: bool = False
    on_error: str = "skip"  # skip | fail
    resume: bool = False
    part_size: int = 4096
    overwrite: bool = (
        False  # replace an existing OUTPUT (atomically: the old one stays until the end)
    )
    source: str = ""  # what answers, for messages: "the server at HOST:PORT", "the model m.onnx"
    update: bool = False  # only new/changed files; rows of deleted ones dropped (embed.update)


@dataclass(frozen=True)
class Summary:
    rows: int  # vectors written
    skipped: int  # inputs left out (listed in OUTPUT.errors.tsv)
    dimension: int
    model_version: str
    already_complete: bool = False


class ModelChangedError(SimclrError):
    """An answer came from another model than the one the output was started with."""


def check_paths(paths: Sequence[Path]) -> None:
    missing = [p for p in paths if not p.exists() and not p.is_symlink()]
    if missing:
        raise SimclrError(f"no such file or folder: {missing[0]}")


def iter_inputs(paths: Sequence[Path]) -> Iterator[Path]:
    """Files as given, folders expanded (recursive, sorted), lazily and in that order."""
    for path in paths:
        if path.is_dir():
            yield from iter_images(path)
        else:
            yield path


def _skip_done(inputs: Iterator[Path], done: int, last: str | None) -> Iterator[Path]:
    """Drop the ``done`` inputs a resumed job already has, checking the listing still agrees."""
    seen: Path | None = None
    for _ in range(done):
        seen = next(inputs, None)
        if seen is None:
            break
    if done and (seen is None or str(seen) != last):
        raise SimclrError(
            f"--resume: the inputs changed since the interrupted run (input {done} was {last}, "
            f"now {seen}); rerun without --resume to start over"
        )
    return inputs


def check_output(cfg: JobConfig) -> None:
    """Refuse to touch an existing OUTPUT (finished or not) unless ``--resume``/``--overwrite``
    says what to do with it; checked before any engine is opened."""
    record = held(cfg.output, cfg.fmt)
    if record is None or cfg.overwrite or (cfg.resume and not record.get("foreign")):
        return
    if cfg.update and record.get("complete"):
        return
    if record.get("foreign"):
        raise SimclrError(
            f"--output {cfg.output} exists and holds {describe_held(record)}; choose another "
            "--output, or --overwrite to replace it"
        )
    raise SimclrError(
        f"--output {cfg.output} already holds {describe_held(record)}; add --resume to continue "
        "it, or --overwrite to replace it (the old output stays readable until the new one is "
        "complete)"
    )


def _staging(output: Path) -> Path:
    return output.with_name(f".{output.name}.overwrite")


def swap_in(staging: Path, output: Path) -> None:
    """A finished Parquet folder built beside OUTPUT replaces it (two renames)."""
    old = output.with_name(f".{output.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if output.exists():
        os.replace(output, old)
    os.replace(staging, output)
    if errors_path(staging).exists():
        os.replace(errors_path(staging), errors_path(output))
    else:
        errors_path(output).unlink(missing_ok=True)
    if old.exists():
        shutil.rmtree(old)


def run_job(
    cfg: JobConfig,
    engine: Engine,
    on_batch: Callable[[EmbedBatch], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> Summary:
    """Run (or continue) the job; raises ``SimclrError`` with a one-line reason on failure.

    ``on_batch`` sees every batch once it is stored (progress, timing statistics); ``say``
    gets the lines a user should see (what a resume continues from).
    """
    check_paths(cfg.paths)
    check_output(cfg)
    started_ns = time.time_ns()
    if cfg.update:
        return _run_update(cfg, engine, on_batch, say)
    info = engine.model_info()
    dim = int(info["projection_dimension" if cfg.kind == "projection" else "feature_dimension"])
    job = {
        "format": cfg.fmt,
        "model_version": info["model_version"],
        "kind": cfg.kind,
        "normalize": cfg.normalize,
        "dimension": dim,
    }
    finished = completed(cfg.output, cfg.fmt)
    if cfg.resume and finished is not None:
        diff = [k for k in job if finished.get(k) != job[k]]
        if diff:
            raise SimclrError(
                f"--resume: {cfg.output} is a finished run made with "
                + ", ".join(f"{k}={finished.get(k)!r}" for k in diff)
                + "; nothing was changed"
            )
        return Summary(finished["rows"], finished["skipped"], dim, job["model_version"], True)
    out = cfg.output
    if cfg.overwrite and cfg.fmt == "parquet" and held(cfg.output, cfg.fmt) is not None:
        out = _staging(cfg.output)  # the old folder stays whole until the new one is finished
        if out.exists():
            shutil.rmtree(out)
    store = open_store(out, cfg.fmt, job, cfg.resume and not cfg.overwrite)
    done = store.progress.inputs
    if done:
        line = (
            f"resuming {cfg.output}: {done:,} inputs already done ({store.progress.rows:,} vectors)"
        )
        log.info(line)
        if say is not None:
            say(line)
    inputs = _skip_done(iter_inputs(cfg.paths), done, store.progress.last)

    fed: collections.deque[str] = collections.deque()  # inputs given to the engine, not yet back

    def feed() -> Iterator[str]:
        for path in inputs:
            fed.append(str(path))
            yield str(path)

    committed, last = done, store.progress.last
    any_input = done > 0
    for batch in engine.embed_iter(feed(), cfg.kind, cfg.normalize, on_error="skip"):
        if batch.model_version and batch.model_version != job["model_version"]:
            # Everything stored before this batch came from the job's model: keep it, resumable.
            if committed != store.progress.inputs:
                store.commit(committed, last or "")
            raise ModelChangedError(
                f"{cfg.source or 'the engine'} now serves model {batch.model_version}; this "
                f"output was started with model {job['model_version']} and keeps its "
                f"{store.progress.rows:,} rows of it. Serve model {job['model_version']} again "
                f"and rerun with --resume, or embed into a new --output (or --overwrite) with "
                f"model {batch.model_version}"
            )
        any_input = True
        names = [fed.popleft() for _ in range(batch.count)]  # [start, start + count)
        first_bad = batch.failures[0].index - batch.start if batch.failures else batch.count
        if cfg.on_error == "fail" and batch.failures:
            ok = [k for k, i in enumerate(batch.indices) if i - batch.start < first_bad]
            store.add([names[batch.indices[k] - batch.start] for k in ok], batch.vectors[ok])
            if first_bad:
                store.commit(committed + first_bad, names[first_bad - 1])
            bad = batch.failures[0]
            saved = store.progress.inputs
            raise SimclrError(
                f"{names[bad.index - batch.start]}: {bad.reason} (--on-error fail; the "
                f"{saved} inputs before it are saved — fix or remove the file and rerun with "
                "--resume, or use --on-error skip)"
            )
        store.add([names[i - batch.start] for i in batch.indices], batch.vectors)
        for failure in batch.failures:
            store.fail(names[failure.index - batch.start], failure.reason)
        committed += batch.count
        last = names[-1]
        if committed - store.progress.inputs >= cfg.part_size:
            store.commit(committed, last)
        if on_batch is not None:
            on_batch(batch)
    if not any_input:
        raise SimclrError(f"no images found in {', '.join(map(str, cfg.paths))}")
    if committed != store.progress.inputs:
        store.commit(committed, last or "")
    store.finish()
    update.write_record(out, cfg.fmt, started_ns)  # what --update compares files with
    if out != cfg.output:
        swap_in(out, cfg.output)
    if store.progress.errors:
        log.info("%d unusable files listed in %s", store.progress.errors, errors_path(cfg.output))
    return Summary(store.progress.rows, store.progress.errors, dim, job["model_version"])


def _run_update(
    cfg: JobConfig,
    engine: Engine,
    on_batch: Callable[[EmbedBatch], None] | None,
    say: Callable[[str], None] | None,
) -> Summary:
    """``--update``: embed only new or changed files into a staging output, then merge it with
    the kept rows of OUTPUT into a new OUTPUT (``embed.update``)."""
    started_ns = time.time_ns()
    job = update.finished_job(cfg.output, cfg.fmt)
    info = engine.model_info()
    wanted = {"model_version": info["model_version"], "kind": cfg.kind, "normalize": cfg.normalize}
    diff = [k for k, v in wanted.items() if job.get(k) != v]
    if diff:
        raise SimclrError(
            f"--update: {cfg.output} was made with "
            + ", ".join(f"{k}={job.get(k)!r}" for k in diff)
            + ", this run has "
            + ", ".join(f"{k}={wanted[k]!r}" for k in diff)
            + "; one output holds one model's vectors (use --overwrite to embed everything anew)"
        )
    inputs = [str(p) for p in iter_inputs(cfg.paths)]
    keep, todo, dropped = update.plan(cfg.output, cfg.fmt, inputs, say or log.info)
    line = f"--update {cfg.output}: {int(keep.sum()):,} rows kept, {dropped:,} dropped (changed or gone), {len(todo):,} files to embed"  # fmt: skip
    log.info(line)
    if say is not None:
        say(line)
    staging = None
    if todo:
        staging = cfg.output.with_name(f".{cfg.output.name}.update")
        update.remove_output(staging, cfg.fmt)
        sub = JobConfig(
            tuple(Path(p) for p in todo), staging, cfg.fmt, cfg.kind, cfg.normalize,
            cfg.on_error, part_size=cfg.part_size, overwrite=True, source=cfg.source,
        )  # fmt: skip
        run_job(sub, engine, on_batch, say)
    rows, skipped = update.merge(cfg.output, cfg.fmt, keep, staging, job, started_ns)
    if staging is not None:
        update.remove_output(staging, cfg.fmt)
    return Summary(rows, skipped, int(job["dimension"]), job["model_version"])
