"""``simclr train --logger tensorboard,mlflow`` against a real local MLflow store (a file store
in a temporary folder, read back with MLflow's own client): params = the resolved config,
metrics at the logged steps, ``last.pt`` and ``config.json`` as artifacts; a stopped run ends
KILLED and ``--resume`` continues the same MLflow run; ``simclr export-onnx`` adds the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from simclr_embed.export.cli import main as export_main  # noqa: E402
from simclr_embed.training.cli import main as train_main  # noqa: E402


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: file stores are opt-in
    mlflow.set_tracking_uri(uri)
    return uri


def test_mlflow_run_params_metrics_artifacts_and_resume(store: str, image_folder: Path, tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "run"
    argv = ["--data", str(image_folder), "--out", str(out), "--device", "cpu", "--arch", "resnet18",
            "--image-size", "32", "--stem", "standard", "--proj-dim", "8", "--batch-size", "8",
            "--max-steps", "4", "--log-every", "1", "--workers", "0", "--no-progress",
            "--logger", "tensorboard,mlflow", "--mlflow-experiment", "simclr-test", "--resume", "auto"]  # fmt: skip
    assert train_main([*argv, "--stop-after-steps", "2"]) == 0  # a time-sliced job: stops at 2
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(store)
    first = client.get_run(run_id)
    assert first.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]

    assert train_main(argv) == 0  # resumes the same MLflow run
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "simclr-test"
    config = json.loads((out / "config.json").read_text())
    assert run.data.params["arch"] == "resnet18" and run.data.params["batch_size"] == "8"
    assert run.data.params["total_steps"] == str(config["total_steps"])
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    for name in ("train/lr", "train/img_per_s", "perf/data_wait", "train/contrastive_top1"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2, 3, 4], name
    assert (out / "tb").is_dir()  # TensorBoard too

    onnx = tmp_path / "model.onnx"
    assert export_main(["--checkpoint", str(out / "checkpoints" / "last.pt"), "--output", str(onnx), "--no-verify"]) == 0  # fmt: skip
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"last.pt", "config.json", "model.onnx"} <= names


def test_logger_flag_is_checked(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        train_main(["--data", str(image_folder), "--out", str(tmp_path / "o"), "--logger", "wandb"])
    assert exit_.value.code == 2 and "--logger" in capsys.readouterr().err
