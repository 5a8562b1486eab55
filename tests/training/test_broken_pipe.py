"""A stopped training run keeps its work when nobody reads its output (issue 20, item 3).

A real run writes its log to a real pipe; the reader closes its end (``… | tee`` after Ctrl-C,
a dead supervisor), the run goes on writing into it, then SIGTERM: ``last.pt`` must be on disk
and the process must exit 0 (torchrun: its workers exit 0; the agent itself reports the signal
with its own code 1) in bounded time — for 0 and 1 DataLoader workers and under torchrun.
Repeated: it is a shutdown race.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simclr_embed.training.checkpoint import load_checkpoint
from tests.conftest import write_image_folder
from tests.training.test_preemption import ENV, REPO, _torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("pipe") / "data", per_class=8)


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen, end = b"", time.monotonic() + timeout
    while needle not in seen:
        left = end - time.monotonic()
        assert left > 0, seen[-2000:]
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, seen[-2000:]  # the run ended before writing what we wait for
            seen += chunk
    return seen


@pytest.mark.parametrize(
    "how", ["workers-0", "workers-1", "workers-1-again", "torchrun"], ids=lambda s: s
)
def test_sigterm_after_the_reader_has_gone_still_checkpoints(
    data: Path, tmp_path: Path, how: str
) -> None:
    out = tmp_path / "out"
    workers = "0" if how == "workers-0" else "1"
    cmd = _torchrun(2) if how == "torchrun" else [sys.executable, "-m", "simclr_embed.training"]
    args = [
        "--data", str(data), "--out", str(out), "--device", "cpu", "--arch", "resnet18",
        "--image-size", "32", "--stem", "standard", "--proj-dim", "16", "--batch-size", "4",
        "--max-steps", "100000", "--checkpoint-every", "100000", "--workers", workers,
        "--log-every", "1",  # and the progress bar: tqdm writes raise, unlike logging
    ]  # fmt: skip
    r, w = os.pipe()
    proc = subprocess.Popen([*cmd, *args], cwd=REPO, env=ENV, stdout=w, stderr=w)
    os.close(w)
    try:
        _read_until(r, b"step 3/", timeout=120)  # training, and writing a line per step
        os.close(r)  # the reader goes away; the run keeps writing into the closed pipe
        r = -1
        time.sleep(1.0)  # a few more steps, each writing its log line into nothing
        assert proc.poll() is None, "the run died of its own broken pipe"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)  # bounded: a hang fails here
    finally:
        if r >= 0:
            os.close(r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == (1 if how == "torchrun" else 0)
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] >= 3
