"""``simclr embed --ray``: the bulk job as a Ray Data pipeline, for more than one machine.

    paths ─▶ read bytes + decode/preprocess (CPU tasks) ─▶ model (actor pool, a GPU each when
    there are GPUs) ─▶ write_parquet

Every step is ordinary code the single-machine path runs too: ``simclr_embed.embed.offline.decode_file``
(the server's ``Preprocessor``) and ``simclr_embed.inference.runtime.open_runtime`` + ``select_output``; the
Parquet table is ``simclr_embed.embed.store``'s. Ray adds the scheduling and the fault tolerance:
decoding runs as tasks (retried on another node when theirs is lost), the model as an actor pool
created with ``max_restarts=-1, max_task_retries=-1`` (an actor on a lost node is restarted
elsewhere and its batch run again), and Ray Data rebuilds lost blocks from their lineage.

Resumable without Ray keeping checkpoints: each model batch is written by the actor itself as
``OUTPUT/part-<first input order>.parquet`` (atomically: a temp file renamed), so a batch run
twice rewrites the same file and a killed run leaves only whole parts; bad files go to
``OUTPUT/_simclr_errors/<first order>.json`` the same way. ``--resume`` reads which paths the
parts and error files hold and embeds only the others. At the end the error files are merged
into ``OUTPUT.errors.tsv`` and the job record says complete. Rows are in input order within a
part and parts in order of their first input; after a resume a part may hold inputs from both
sides of an earlier one (every path is still there exactly once).

On a cluster: install simclr-embed on every node, put the model, the images and OUTPUT where
every node sees them (shared filesystem), and point ``--ray`` at the cluster (``ray://head:10001``
or ``auto`` on a node of it).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simclr_embed.embed.job import swap_in
from simclr_embed.embed.store import ParquetStore, embedding_table, errors_path
from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_path, atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

ERRORS_DIR = "_simclr_errors"


def decode_batch(
    batch: dict[str, np.ndarray],
    size: int,
    policy: str,
    max_pixels: int,
    errors_dir: str,
    fail: bool,
) -> dict[str, np.ndarray]:
    """Ray task body: ``{"order", "path"}`` rows → the same plus ``pixels`` ``[n, S, S, 3]`` and
    ``ok``; failed rows are also written to ``errors_dir``. A task, not an actor: a lost node's
    tasks are simply run again elsewhere, and building a ``Preprocessor`` costs nothing."""
    from simclr_embed.embed.offline import decode_file
    from simclr_embed.inference.images import Preprocessor

    pre = Preprocessor(size, policy, max_pixels)
    pixels = np.zeros((len(batch["path"]), size, size, 3), np.uint8)
    errors = []
    for i, path in enumerate(batch["path"]):
        out = decode_file(str(path), pre)
        if isinstance(out, str):
            if fail:
                raise SimclrError(f"{path}: {out} (--on-error fail)")
            errors.append((int(batch["order"][i]), str(path), out))
        else:
            pixels[i] = out
    if errors:  # named by the first order: a re-executed task overwrites, never duplicates
        atomic_write_bytes(
            Path(errors_dir) / f"{errors[0][0]:012d}.json", json.dumps(errors).encode()
        )
    bad = {order for order, _, _ in errors}
    return {
        "order": batch["order"],
        "path": batch["path"],
        "pixels": pixels,
        "ok": np.array([int(o) not in bad for o in batch["order"]]),
    }


class Embed:
    """Ray actor: the model, built once per actor; rows that decoded → a Parquet part written
    here (``part-<first order>.parquet``, atomically); returns ``{"rows"}`` for the count."""

    def __init__(
        self,
        model: str,
        device: str,
        batch: int,
        kind: str,
        normalize: bool,
        job: dict[str, Any],
        output: str,
    ) -> None:
        from simclr_embed.inference.runtime import open_runtime

        self.runtime = open_runtime(model, device=device, max_batch_size=batch)
        self.kind, self.normalize, self.job, self.output = kind, normalize, job, Path(output)
        found = self.runtime.info.model_version
        if found != job["model_version"]:  # the file was replaced after the job started
            raise SimclrError(
                f"{model} now holds model {found}; this output was started with model "
                f"{job['model_version']}: never a vector of another model in it"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        from simclr_embed.inference.runtime import select_output

        ok = batch["ok"].astype(bool)
        if ok.any():
            outputs = self.runtime.encode(np.ascontiguousarray(batch["pixels"][ok]))
            vectors = select_output(outputs, self.kind, self.normalize)  # [n_ok, D]
            table = embedding_table([str(p) for p in batch["path"][ok]], vectors, self.job)
            part = self.output / f"part-{int(batch['order'][0]):012d}.parquet"
            with atomic_path(part) as tmp:  # a re-run batch replaces the same part whole
                pq.write_table(table, tmp)
        return {"rows": np.array([int(ok.sum())])}


def _held(output: Path) -> tuple[set[str], dict[int, tuple[str, str]]]:
    """What an interrupted run left: the paths in its whole parts, and its failures by order."""
    import pyarrow.parquet as pq

    paths: set[str] = set()
    for part in sorted(output.glob("part-*.parquet")):
        paths.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
    failures: dict[int, tuple[str, str]] = {}
    for part in sorted((output / ERRORS_DIR).glob("*.json")):
        for order, path, reason in json.loads(part.read_text()):
            failures[int(order)] = (path, reason)
    return paths, failures


def _start(output: Path, job: dict[str, Any], resume: bool) -> Path:
    """The folder to write into: OUTPUT itself, or a staging folder beside it when an existing
    output is replaced (it stays whole until the new one is complete)."""
    record_file = output / ParquetStore.job_name
    if resume and record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("engine") != "ray":
            raise SimclrError(
                f"--resume: {output} was not written by --ray; resume it the way it was made"
            )
        diff = [k for k in job if record.get(k) != job[k]]
        if diff:
            raise SimclrError(
                f"--resume: {output} was started with "
                + ", ".join(f"{k}={record.get(k)!r}" for k in diff)
                + "; nothing was changed"
            )
        (output / ERRORS_DIR).mkdir(exist_ok=True)
        return output
    ParquetStore.check_output(output)
    work = output
    if output.exists() and any(output.iterdir()):
        work = output.with_name(f".{output.name}.overwrite")
    if work.exists():
        shutil.rmtree(work)
    (work / ERRORS_DIR).mkdir(parents=True)
    record = {**job, "complete": False, "engine": "ray"}
    atomic_write_text(work / ParquetStore.job_name, json.dumps(record, indent=2) + "\n")
    return work


def run_ray(
    address: str | None,
    model: Path,
    inputs: Sequence[str],
    output: Path,
    *,
    kind: str,
    normalize: bool,
    on_error: str,
    batch: int,
    device: str,
    job: dict[str, Any],
    info: Any,
    max_pixels: int,
    resume: bool = False,
    say: Callable[[str], None] | None = None,
) -> tuple[int, int]:
    """Run (or, with ``resume``, continue) the pipeline; returns (rows written, files skipped)."""
    try:
        import pyarrow as pa
        import ray
    except ImportError as exc:
        raise SimclrError(
            f"--ray needs Ray Data ({exc.name} is missing): pip install 'simclr-embed[ray]'"
        ) from None
    record_file = output / ParquetStore.job_name
    if resume and record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("complete") and record.get("engine") == "ray":
            _start(output, job, resume=True)  # the same job? (else a one-line refusal)
            return int(record["rows"]), int(record["skipped"])
    work = _start(output, job, resume)
    errors_dir = work / ERRORS_DIR
    held, failures = _held(work)
    known = set(inputs)
    stale = len(held - known)
    if stale:
        raise SimclrError(
            f"--resume: {stale} paths embedded by the interrupted run are no longer among the "
            "inputs; rerun without --resume (or --overwrite) to start over"
        )
    failed = {path for path, _ in failures.values()}
    todo = [(i, p) for i, p in enumerate(inputs) if p not in held and p not in failed]
    if resume and (held or failed):
        line = f"resuming {output}: {len(inputs) - len(todo)} of {len(inputs)} inputs already done"
        log.info(line)
        if say is not None:
            say(line)
    if todo:
        _pipeline(ray, pa, address, model, todo, work, kind=kind, normalize=normalize,
                  on_error=on_error, batch=batch, device=device, job=job, info=info,
                  max_pixels=max_pixels)  # fmt: skip
    _, failures = _held(work) if todo else (held, failures)
    shutil.rmtree(errors_dir)
    lines = [f"{p}\t{' '.join(r.split())}\n" for _, (p, r) in sorted(failures.items())]
    if lines:
        atomic_write_text(errors_path(work), "".join(lines))
    else:
        errors_path(work).unlink(missing_ok=True)
    rows = len(inputs) - len(failures)
    record = {**job, "complete": True, "rows": rows, "skipped": len(failures), "engine": "ray"}
    atomic_write_text(work / ParquetStore.job_name, json.dumps(record, indent=2) + "\n")
    if work != output:
        swap_in(work, output)
    return rows, len(failures)


def _pipeline(ray: Any, pa: Any, address: str | None, model: Path, todo: list[tuple[int, str]],
              work: Path, **kw: Any) -> None:  # fmt: skip
    """decode tasks → model actors writing parts; raises ``SimclrError`` on failure (the parts
    written so far stay: ``--resume`` continues from them)."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-stage INFO chatter
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=None if address in (None, "", "local") else address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # batches, hence part names, in input order
        ctx.enable_progress_bars = False
        gpus = int(ray.cluster_resources().get("GPU", 0)) if kw["device"] != "cpu" else 0
        orders, paths = zip(*todo, strict=True)
        table = pa.table({"order": pa.array(orders, pa.int64()), "path": list(paths)})
        ds = ray.data.from_arrow(table).map_batches(
            decode_batch,
            fn_kwargs={
                "size": kw["info"].image_size,
                "policy": kw["info"].resize,
                "max_pixels": kw["max_pixels"],
                "errors_dir": str(work / ERRORS_DIR),
                "fail": kw["on_error"] == "fail",
            },
            batch_size=kw["batch"],
            num_cpus=1,
        )
        ds = ds.map_batches(
            Embed,
            fn_constructor_kwargs={
                "model": str(model.resolve()),
                "device": "cuda" if gpus else "cpu",
                "batch": kw["batch"],
                "kind": kw["kind"],
                "normalize": kw["normalize"],
                "job": kw["job"],
                "output": str(work.resolve()),
            },
            batch_size=kw["batch"],
            concurrency=max(1, gpus),
            max_restarts=-1,  # an actor on a lost node comes back elsewhere ...
            max_task_retries=-1,  # ... and the batch it held runs again
            **({"num_gpus": 1} if gpus else {"num_cpus": 1}),
        )
        for _ in ds.iter_batches(batch_size=None):  # drive it; the parts are the result
            pass
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc
        text = str(cause).strip().splitlines()
        raise SimclrError(
            f"Ray pipeline failed: {text[-1] if text else type(cause).__name__} "
            "(the parts written so far are kept: rerun with --resume)"
        ) from None
    finally:
        if started:
            ray.shutdown()
