"""``simclr embed --ray``: the bulk job as a Ray Data pipeline, for more than one machine.

    paths ─▶ read bytes + decode/preprocess (CPU tasks) ─▶ model (actor pool, a GPU each when
    there are GPUs) ─▶ write_parquet

Every step is ordinary code the single-machine path runs too: ``simclr_embed.embed.offline.decode_file``
(the server's ``Preprocessor``) and ``simclr_embed.inference.runtime.open_runtime`` + ``select_output``; the
Parquet table is ``simclr_embed.embed.store``'s. Ray adds the scheduling. Bad files are skipped and
listed as everywhere else: each decode task writes the rows it could not use to a small file
under ``OUTPUT/_simclr_errors/`` (a re-executed task rewrites the same rows), merged into
``OUTPUT.errors.tsv`` at the end. ``preserve_order`` keeps rows, and part files, in input order.

On a cluster: install simclr-embed on every node, put the model and the images where every node
sees them (shared filesystem), and point ``--ray`` at the cluster (``ray://head:10001`` or
``auto`` on a node of it). Ray Data has no checkpoints, so there is no ``--resume`` here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simclr_embed.embed.store import ParquetStore, embedding_table, errors_path
from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_write_text

log = logging.getLogger(__name__)

ERRORS_DIR = "_simclr_errors"


class Decode:
    """Ray task body: ``{"order", "path"}`` rows → the same plus ``pixels`` ``[n, S, S, 3]`` and
    ``error`` (empty when usable); failed rows are also written to ``errors_dir``."""

    def __init__(
        self, size: int, policy: str, max_pixels: int, errors_dir: str, fail: bool
    ) -> None:
        from simclr_embed.inference.images import Preprocessor

        self.pre = Preprocessor(size, policy, max_pixels)
        self.errors_dir, self.fail = Path(errors_dir), fail

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from simclr_embed.embed.offline import decode_file

        s = self.pre.size
        pixels = np.zeros((len(batch["path"]), s, s, 3), np.uint8)
        errors = []
        for i, path in enumerate(batch["path"]):
            out = decode_file(str(path), self.pre)
            if isinstance(out, str):
                if self.fail:
                    raise SimclrError(f"{path}: {out} (--on-error fail)")
                errors.append((int(batch["order"][i]), str(path), out))
            else:
                pixels[i] = out
        if errors:  # named by the first order: a re-executed task overwrites, never duplicates
            name = self.errors_dir / f"{errors[0][0]:012d}.json"
            tmp = name.with_name(f".{name.name}.{uuid.uuid4().hex}")
            tmp.write_text(json.dumps(errors))
            os.replace(tmp, name)
        bad = {order for order, _, _ in errors}
        return {
            "order": batch["order"],
            "path": batch["path"],
            "pixels": pixels,
            "ok": np.array([int(o) not in bad for o in batch["order"]]),
        }


class Embed:
    """Ray actor: the model, built once per actor; rows that decoded → a Parquet table."""

    def __init__(
        self, model: str, device: str, batch: int, kind: str, normalize: bool, job: dict[str, Any]
    ) -> None:
        from simclr_embed.inference.runtime import open_runtime

        self.runtime = open_runtime(model, device=device, max_batch_size=batch)
        self.kind, self.normalize, self.job = kind, normalize, job
        found = self.runtime.info.model_version
        if found != job["model_version"]:  # the file was replaced after the job started
            raise SimclrError(
                f"{model} now holds model {found}; this output was started with model "
                f"{job['model_version']}: never a vector of another model in it"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        from simclr_embed.inference.runtime import select_output

        ok = batch["ok"].astype(bool)
        dim = int(self.job["dimension"])
        vectors = np.zeros((0, dim), np.float32)
        if ok.any():
            outputs = self.runtime.encode(np.ascontiguousarray(batch["pixels"][ok]))
            vectors = select_output(outputs, self.kind, self.normalize)
        return embedding_table([str(p) for p in batch["path"][ok]], vectors, self.job)


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
) -> tuple[int, int]:
    """Run the pipeline; returns (rows written, files skipped)."""
    try:
        import pyarrow as pa
        import ray
    except ImportError as exc:
        raise SimclrError(
            f"--ray needs Ray Data ({exc.name} is missing): pip install 'simclr-embed[ray]'"
        ) from None
    ParquetStore.check_output(output)
    if output.exists():
        shutil.rmtree(output)
    errors_dir = output / ERRORS_DIR
    errors_dir.mkdir(parents=True)
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
        ctx.execution_options.preserve_order = True  # rows and part files in input order
        ctx.enable_progress_bars = False
        gpus = int(ray.cluster_resources().get("GPU", 0)) if device != "cpu" else 0
        table = pa.table({"order": pa.array(range(len(inputs)), pa.int64()), "path": inputs})
        ds = ray.data.from_arrow(table)
        ds = ds.map_batches(
            Decode,
            fn_constructor_kwargs={
                "size": info.image_size,
                "policy": info.resize,
                "max_pixels": max_pixels,
                "errors_dir": str(errors_dir),
                "fail": on_error == "fail",
            },
            batch_size=batch,
            num_cpus=1,
            concurrency=max(1, int(ray.cluster_resources().get("CPU", 1)) - (0 if gpus else 1)),
        )
        ds = ds.map_batches(
            Embed,
            fn_constructor_kwargs={
                "model": str(model.resolve()),
                "device": "cuda" if gpus else "cpu",
                "batch": batch,
                "kind": kind,
                "normalize": normalize,
                "job": job,
            },
            batch_size=batch,
            concurrency=max(1, gpus),
            **({"num_gpus": 1} if gpus else {"num_cpus": 1}),
        )
        ds.write_parquet(str(output))
    except Exception as exc:
        shutil.rmtree(output, ignore_errors=True)  # a failed Ray run is not resumable
        cause = getattr(exc, "cause", None) or exc
        text = str(cause).strip().splitlines()
        raise SimclrError(
            f"Ray pipeline failed: {text[-1] if text else type(cause).__name__}"
        ) from None
    finally:
        if started:
            ray.shutdown()
    failures = []
    for part in sorted(errors_dir.glob("*.json")):
        failures += json.loads(part.read_text())
    shutil.rmtree(errors_dir)
    failures.sort()
    if failures:
        atomic_write_text(
            errors_path(output), "".join(f"{p}\t{' '.join(r.split())}\n" for _, p, r in failures)
        )
    else:
        errors_path(output).unlink(missing_ok=True)
    rows = len(inputs) - len(failures)
    record = {**job, "complete": True, "rows": rows, "skipped": len(failures), "engine": "ray"}
    atomic_write_text(output / ParquetStore.job_name, json.dumps(record, indent=2) + "\n")
    return rows, len(failures)
