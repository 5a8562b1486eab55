"""Preemption with real processes and real signals: SIGTERM/SIGUSR1 → checkpoint at that step,
exit 0; ``--resume auto`` continues to exactly the uninterrupted result; torchrun's process group,
one rank signalled alone, a restart at another world size."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from simclr_embed.errors import run_main
from simclr_embed.training.checkpoint import load_checkpoint
from simclr_embed.training.cli import main
from tests.conftest import write_image_folder

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
STEPS = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("preempt") / "data", per_class=8)  # 24


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--device", "cpu", "--arch", "resnet18",
        "--image-size", "32", "--stem", "standard", "--proj-dim", "16", "--batch-size", "4",
        "--max-steps", str(STEPS), "--warmup-steps", "4", "--checkpoint-every", "6",
        "--keep-checkpoints", "1", "--workers", "0", "--log-every", "1", "--no-progress",
        "--seed", "5", *extra,
    ]  # fmt: skip


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "simclr_embed.training"]  # fmt: skip


class Run:
    """A training command as a process; its output collected line by line."""

    def __init__(self, cmd: list[str], new_session: bool = False) -> None:
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=new_session,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(
            target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),  # type: ignore[union-attr]
            daemon=True,
        )
        self._reader.start()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_step(self, step: int, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while not re.search(rf"step {step}/{STEPS}", self.log):
            assert self.proc.poll() is None, self.log[-3000:]
            assert time.monotonic() < end, self.log[-3000:]
            time.sleep(0.01)

    def finish(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout)  # bounded: a hang fails here
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL) if self._in_session() else self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        return code

    def _in_session(self) -> bool:
        try:
            return os.getpgid(self.proc.pid) == self.proc.pid
        except ProcessLookupError:
            return False


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # bit for bit


def _stop_step(log: str, signal_name: str) -> int:
    found = re.search(rf"stopped by {signal_name} at step (\d+) of {STEPS}", log)
    assert found, log[-3000:]
    return int(found.group(1))


def test_sigterm_checkpoints_and_resume_auto_is_bit_exact(data: Path, tmp_path: Path) -> None:
    straight, out = tmp_path / "straight", tmp_path / "out"
    ref = Run([sys.executable, "-m", "simclr_embed.training", *_args(data, straight)])
    assert ref.finish() == 0, ref.log[-3000:]
    run = Run(
        [sys.executable, "-m", "simclr_embed.training", *_args(data, out, "--resume", "auto")]
    )
    run.wait_step(4)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.log[-3000:]
    step = _stop_step(run.log, "SIGTERM")
    assert 4 <= step < STEPS  # where it was (checkpoints every 6 steps: not one of those alone)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == step
    assert "--resume auto" in run.log
    again = Run(
        [sys.executable, "-m", "simclr_embed.training", *_args(data, out, "--resume", "auto")]
    )
    assert again.finish() == 0, again.log[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'last.pt'}: step {step}" in again.log
    _same_weights(out / "checkpoints" / "last.pt", straight / "checkpoints" / "last.pt")


@pytest.mark.ddp
def test_torchrun_process_group_sigterm_then_resume(data: Path, tmp_path: Path) -> None:
    """SIGTERM to torchrun and its workers at once (what a scheduler does): one last.pt at the
    agreed step, every process gone in bounded time; --resume auto = the uninterrupted run."""
    straight, out = tmp_path / "straight", tmp_path / "out"
    ref = Run([*_torchrun(2), *_args(data, straight)])
    assert ref.finish() == 0, ref.log[-3000:]
    run = Run([*_torchrun(2), *_args(data, out, "--resume", "auto")], new_session=True)
    run.wait_step(4)
    os.killpg(run.proc.pid, signal.SIGTERM)
    run.finish(timeout=90)  # torchrun itself reports the signal; the workers exit 0
    step = _stop_step(run.log, "SIGTERM")
    assert run.log.count(f"(step {step})") == 1  # rank 0 wrote one checkpoint at that step
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == step
    again = Run([*_torchrun(2), *_args(data, out, "--resume", "auto")])
    assert again.finish() == 0, again.log[-3000:]
    _same_weights(out / "checkpoints" / "last.pt", straight / "checkpoints" / "last.pt")


def _rank0_pid(torchrun_pid: int, timeout: float = 60) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
        for child in children:
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"RANK=0" in environ:
                return int(child)
        time.sleep(0.05)
    raise AssertionError("no rank-0 worker found")


@pytest.mark.ddp
def test_sigusr1_to_rank0_alone_then_resume_on_one_process(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = Run([*_torchrun(2), *_args(data, out)])
    run.wait_step(4)
    os.kill(_rank0_pid(run.proc.pid), signal.SIGUSR1)  # rank 1 never sees a signal
    assert run.finish(timeout=90) == 0, run.log[-3000:]  # both ranks stopped together, exit 0
    step = _stop_step(run.log, "SIGUSR1")
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == step and ckpt["config"]["world_size"] == 2
    # A requeue onto one process: the same command continues, with a warning.
    one = Run(
        [sys.executable, "-m", "simclr_embed.training", *_args(data, out, "--resume", "auto")]
    )
    assert one.finish() == 0, one.log[-3000:]
    assert "not bit-exactly" in one.log and "global batch 8" in one.log
    final = load_checkpoint(out / "checkpoints" / "last.pt")
    assert final["step"] == STEPS and final["config"]["world_size"] == 1


def test_resume_auto_starts_fresh_and_a_finished_run_exits_at_once(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    short = [a if a != str(STEPS) else "3" for a in _args(data, out, "--resume", "auto")]
    assert run_main(main, short) == 0  # nothing there: a fresh run
    last = out / "checkpoints" / "last.pt"
    before = (last.read_bytes(), last.stat().st_mtime_ns)
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert run_main(main, short) == 0
    assert "already finished: step 3 of 3" in caplog.text
    assert (last.read_bytes(), last.stat().st_mtime_ns) == before
