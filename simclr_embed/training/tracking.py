"""Experiment tracking in MLflow (``--logger tensorboard,mlflow``; ``pip install
'simclr-embed[mlflow]'``), on rank 0, beside TensorBoard.

- **where**: MLflow's own ``MLFLOW_TRACKING_URI`` (a tracking server ``http://…``, a database
  ``sqlite:///mlflow.db``, a folder ``file:…``); the experiment from ``--mlflow-experiment``;
- **params**: the resolved config (what ``OUT/config.json`` holds), flattened;
- **metrics**: the TensorBoard scalars under the same names (train/loss, train/lr,
  train/img_per_s, train/contrastive_top1, perf/data_wait, eval/knn_top1) at the same steps;
- **artifacts**: ``last.pt`` and ``config.json`` at the end of the run; ``simclr export-onnx
  --checkpoint OUT/checkpoints/last.pt`` then adds the exported ``.onnx`` to the same run
  (:func:`log_export`: it finds ``OUT/mlflow_run.json``) — what ``simclr serve`` takes;
- **resume**: the run id is kept in ``OUT/mlflow_run.json``, so ``--resume`` (a preemption, a
  requeue) continues the same MLflow run instead of starting a second one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_write_text

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"
LOGGERS = ("tensorboard", "mlflow")


def _flat(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]  # MLflow's limit on a param value
    return out


class MlflowRun:
    def __init__(self, out: Path, params: Mapping[str, Any], experiment: str | None) -> None:
        try:
            import mlflow
        except ImportError:
            raise SimclrError(
                "--logger mlflow needs MLflow: pip install 'simclr-embed[mlflow]'"
            ) from None
        self.mlflow, self.out = mlflow, out
        record = out / RUN_FILE
        run_id = json.loads(record.read_text())["run_id"] if record.is_file() else None
        if experiment and run_id is None:
            mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else out.name)
        self.run_id = run.info.run_id
        if run_id is None:
            mlflow.log_params(_flat(params))
            atomic_write_text(record, json.dumps({"run_id": self.run_id, "tracking_uri": mlflow.get_tracking_uri()}) + "\n")  # fmt: skip
        log.info("MLflow run %s (%s)", self.run_id, "resumed" if run_id else "new")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def finish(self, checkpoint: Path | None, stopped: bool) -> None:
        """The artifacts of a finished run (a stopped one only ends, to be resumed)."""
        if checkpoint is not None and not stopped:
            self.mlflow.log_artifact(str(checkpoint))
            self.mlflow.log_artifact(str(self.out / "config.json"))
        self.mlflow.end_run("KILLED" if stopped else "FINISHED")


def log_export(checkpoint: Path, exported: Path) -> str | None:
    """Add an exported model to the MLflow run that trained ``checkpoint`` (``OUT/checkpoints/
    last.pt`` → ``OUT/mlflow_run.json``); returns the run id, or None when there is none."""
    record = Path(checkpoint).resolve().parent.parent / RUN_FILE
    if not record.is_file():
        return None
    try:
        import mlflow
    except ImportError:
        log.warning("%s names an MLflow run but MLflow is not installed here", record)
        return None
    saved = json.loads(record.read_text())
    run_id = saved["run_id"]
    if saved.get("tracking_uri"):
        mlflow.set_tracking_uri(saved["tracking_uri"])  # where the training process logged
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(exported))
    return str(run_id)
