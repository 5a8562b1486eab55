"""``--log-format json``: a real ``simclr serve`` and a real ``simclr train`` write one JSON object
per stderr line (time, level, logger, message), and the auth token never appears — not from the
environment, not from a flag, not inside a ``Bearer`` header someone logs."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simclr_embed import logs
from simclr_embed.client import EmbeddingClient
from simclr_embed.errors import SimclrError, run_main
from tests.server.conftest import REPO, ServerProcess, encode, photo

SECRET = "s3cret-token-9f8e7d"


def _records(text: str) -> list[dict[str, object]]:
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)  # every line is one JSON object
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        dt.datetime.fromisoformat(str(record["time"]))
        records.append(record)
    return records


@pytest.mark.slow
def test_serve_logs_json_without_the_token(tiny_onnx: Path) -> None:
    server = ServerProcess("--model", str(tiny_onnx), "--device", "cpu", "--port", "0",
                           "--log-format", "json", "--log-level", "debug", "--auth-token", SECRET)  # fmt: skip
    try:
        port = server.wait_serving()
        with EmbeddingClient(f"127.0.0.1:{port}", token=SECRET) as client:
            client.embed([encode(photo(32, 32), "PNG")])
        server.terminate()
        assert server.wait(30) == 0
    finally:
        server.kill()
    records = _records(server.log)
    assert any("SERVING on" in str(r["message"]) for r in records)
    assert {r["level"] for r in records} >= {"INFO"}
    assert SECRET not in server.log


@pytest.mark.slow
def test_train_logs_json(image_folder: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "simclr_embed.training", "--data", str(image_folder), "--out",
         str(tmp_path / "o"), "--device", "cpu", "--arch", "resnet18", "--image-size", "32",
         "--stem", "standard", "--proj-dim", "8", "--batch-size", "8", "--max-steps", "2",
         "--workers", "0", "--no-progress", "--log-every", "1", "--log-format", "json"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(proc.stderr)
    messages = [str(r["message"]) for r in records]
    assert any(m.startswith("step 2/2") for m in messages), messages
    assert any(r["logger"] == "simclr_embed.training.train" for r in records)


def test_redaction_and_exceptions(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("SIMCLR_AUTH_TOKEN", "env-token-1234")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("json", logging.INFO, secrets=["flag-token-5678"])
        log = logging.getLogger("simclr_embed.test")
        log.info("headers %s", {"authorization": "Bearer abc.def-ghi"})
        log.info("env %s flag %s", "env-token-1234", "flag-token-5678", extra={"request_id": "r-1"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")

        def fails(argv: object) -> int:
            raise SimclrError("no such folder: /nowhere")

        assert run_main(fails) == 1  # a command's one-line error: a JSON record too
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    first, second, third, fourth = _records(err)
    assert first["message"] == "headers {'authorization': 'Bearer ***'}"
    assert second["message"] == "env *** flag ***" and second["request_id"] == "r-1"
    assert third["level"] == "ERROR" and "ValueError: boom" in str(third["exception"])
    assert fourth["level"] == "ERROR" and fourth["message"] == "error: no such folder: /nowhere"
    for secret in ("abc.def-ghi", "env-token-1234", "flag-token-5678"):
        assert secret not in err
