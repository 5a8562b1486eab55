"""Three ``simclr serve`` replicas on loopback under one ``simclr embed --target a,b,c`` (the
client's health-aware round-robin, gRPC's retry policy, ``--resend``): one replica SIGKILLed
mid-run and started again, then a rolling restart (SIGTERM → drained exit → start, one replica at
a time) under a running job. Either way the job exits 0 and its output is byte-identical to the
same job run offline: nothing lost, nothing duplicated, nothing reordered."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simclr_embed.cli import main as simclr
from tests.conftest import write_image_folder
from tests.server.conftest import REPO, ServerProcess

pytestmark = pytest.mark.slow

REPLICA = ("--device", "cpu", "--drain-delay-s", "0.3", "--intra-op-threads", "1")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("rep"), per_class=3000, size=16)


@pytest.fixture(scope="module")
def offline(photos: Path, tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("off") / "whole.npy"
    assert simclr(["embed", "--no-progress", "--model", str(tiny_onnx), "--output", str(out), str(photos)]) == 0  # fmt: skip
    return out


class Replicas:
    def __init__(self, model: Path) -> None:
        self.model = model
        self.procs = [ServerProcess("--model", str(model), *REPLICA, "--port", "0") for _ in range(3)]  # fmt: skip
        self.ports = [p.wait_serving() for p in self.procs]

    @property
    def target(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, i: int) -> None:
        self.procs[i] = ServerProcess("--model", str(self.model), *REPLICA, "--port", str(self.ports[i]))  # fmt: skip
        self.procs[i].wait_serving()

    def close(self) -> None:
        for p in self.procs:
            if p.proc.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def replicas(tiny_onnx: Path) -> Iterator[Replicas]:
    r = Replicas(tiny_onnx)
    try:
        yield r
    finally:
        r.close()


def _embed(target: str, photos: Path, out: Path) -> subprocess.Popen[str]:
    # One request in flight of 2 images: slow enough for three restarts to happen under it.
    return subprocess.Popen(
        [sys.executable, "-m", "simclr_embed.cli", "embed", "--no-progress", "--target", target,
         "--output", str(out), "--batch", "2", "--concurrency", "1", "--resend", "8",
         "--part-size", "256", str(photos)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_parts(out: Path, n: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    journal = out.with_name(out.name + ".partial") / "journal.jsonl"
    end = time.monotonic() + timeout
    while not (journal.exists() and journal.read_text().count("\n") >= n):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end
        time.sleep(0.02)


def _finish(proc: subprocess.Popen[str], out: Path, offline: Path) -> None:
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    assert out.read_bytes() == offline.read_bytes()
    assert Path(f"{out}.paths.txt").read_text() == Path(f"{offline}.paths.txt").read_text()


def test_a_replica_killed_and_restarted_mid_run(replicas: Replicas, photos: Path,
                                                offline: Path, tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "out.npy"
    proc = _embed(replicas.target, photos, out)
    try:
        _wait_parts(out, 2, proc)
        replicas.procs[1].kill()  # SIGKILL: in-flight requests on it fail, the others take over
        replicas.start(1)
        assert proc.poll() is None, "the job ended before the replica came back"
        _finish(proc, out, offline)
    finally:
        proc.kill()


def test_rolling_restart_under_a_running_job(replicas: Replicas, photos: Path,
                                             offline: Path, tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "out.npy"
    proc = _embed(replicas.target, photos, out)
    try:
        _wait_parts(out, 1, proc)
        for i in range(3):
            replicas.procs[i].terminate()  # drains: NOT_SERVING, in-flight answered, exit 0
            assert replicas.procs[i].wait(30) == 0
            replicas.start(i)
        assert proc.poll() is None, "the job ended before the rolling restart did"
        _finish(proc, out, offline)
    finally:
        proc.kill()
