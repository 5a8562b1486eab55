"""``simclr embed --ray ADDRESS`` on a real Ray cluster: a head and two worker raylets started
with ``ray start`` (separate processes, separate object stores, token authentication), the
driver in its own process. A worker node SIGKILLed mid-run: the job still finishes, every path
exactly once with the vector the offline path gives it. The driver SIGKILLed mid-run: ``--resume``
embeds only what is missing, leaves the parts already written untouched, and ends equal to a
clean run. Every process of the cluster is found by a marker in its environment and stopped by
its id."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from simclr_embed.cli import main as simclr
from tests.conftest import write_image_folder

pytest.importorskip("ray")
pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked(mark: str) -> list[int]:
    """Processes whose environment carries ``SIMCLR_TEST_RAY=mark`` (everything ``ray start``
    spawned inherits it), by id."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"SIMCLR_TEST_RAY={mark}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return sorted(found)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Cluster:
    def __init__(self) -> None:
        self.mark = secrets.token_hex(6)
        self.port = _port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: socket paths
        self.env = {
            **os.environ,
            "SIMCLR_TEST_RAY": self.mark,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "PYTHONPATH": str(REPO),
        }
        self.workers: list[int] = []  # raylet ids of the worker nodes

    def _start(self, *args: str) -> None:
        before = set(self._raylets())
        common = ["--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]
        proc = subprocess.run([str(RAY), "start", *args, *common], env=self.env,
                              capture_output=True, text=True, timeout=90)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        new = sorted(set(self._raylets()) - before)
        assert len(new) == 1, new
        if "--head" not in args:
            self.workers += new

    def _raylets(self) -> list[int]:
        return [p for p in _marked(self.mark) if "raylet/raylet" in _cmdline(p)]

    def start(self) -> Cluster:
        # The head schedules nothing (0 CPUs): the work runs on the two worker nodes.
        self._start("--head", "--port", str(self.port), "--num-cpus", "0",
                    "--temp-dir", str(self.temp), "--include-dashboard", "false")  # fmt: skip
        for _ in range(2):
            self._start("--address", self.address, "--num-cpus", "2")
        return self

    def lose_node(self, raylet: int) -> None:
        """A worker node is gone: its raylet and every process under it, SIGKILLed."""
        victims = [raylet] + [p for p in _marked(self.mark) if _parent(p) == raylet]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        for _ in range(20):
            left = _marked(self.mark)
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        shutil.rmtree(self.temp, ignore_errors=True)
        assert not _marked(self.mark), "Ray processes left running"


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):
        return -1


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("photos"), per_class=400, size=16)


@pytest.fixture(scope="module")
def reference(photos: Path, tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:  # fmt: skip
    out = tmp_path_factory.mktemp("ref") / "ref.npy"
    assert simclr(["embed", "--model", str(tiny_onnx), "--output", str(out), "--no-progress", str(photos)]) == 0  # fmt: skip
    paths = (out.parent / "ref.npy.paths.txt").read_text().splitlines()
    return dict(zip(paths, np.load(out), strict=True))


def _driver(cluster: Cluster, model: Path, photos: Path, out: Path, *extra: str) -> subprocess.Popen[str]:  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "simclr_embed.cli", "embed", "--ray", cluster.address,
         "--model", str(model), "--format", "parquet", "--output", str(out), "--batch", "32",
         "--no-progress", *extra, str(photos)],
        cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_parts(out: Path, n: int, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while len(list(out.glob("part-*.parquet"))) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"fewer than {n} parts after {timeout} s"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the driver did not finish:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-3000:]
    return stdout + stderr


def _check_equal(out: Path, reference: dict[str, np.ndarray]) -> None:
    """Every path exactly once, each with the offline vector; the job record complete."""
    table = pyarrow_parquet.read_table(out, columns=["path", "embedding"])
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == len(reference)
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    want = np.stack([reference[p] for p in paths])
    np.testing.assert_allclose(vectors, want, rtol=1e-5, atol=1e-5)
    assert '"complete": true' in (out / "_simclr_job.json").read_text()


def test_a_worker_node_lost_mid_run(cluster: Cluster, photos: Path, tiny_onnx: Path,
                                    reference: dict[str, np.ndarray], tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "emb"
    proc = _driver(cluster, tiny_onnx, photos, out)
    try:
        _wait_parts(out, 5, proc)
        cluster.lose_node(cluster.workers[-1])
        assert proc.poll() is None, "the job ended before the node was lost"
        _finish(proc)
    finally:
        proc.kill()
    _check_equal(out, reference)


def test_driver_killed_then_resume(cluster: Cluster, photos: Path, tiny_onnx: Path,
                                   reference: dict[str, np.ndarray], tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "emb"
    proc = _driver(cluster, tiny_onnx, photos, out)
    try:
        _wait_parts(out, 5, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    time.sleep(1.0)  # the cluster notices the driver is gone and stops its workers
    before = {p.name: p.stat().st_ino for p in out.glob("part-*.parquet")}
    done = sum(pyarrow_parquet.read_metadata(out / n).num_rows for n in before)
    log = _finish(_driver(cluster, tiny_onnx, photos, out, "--resume"))
    said = re.search(r"resuming \S+: (\d+) of (\d+) inputs already done", log)
    assert said, log
    assert done <= int(said[1]) < int(said[2]) == len(reference)  # only the rest was embedded
    after = {p.name: p.stat().st_ino for p in out.glob("part-*.parquet")}
    assert all(after.get(name) == ino for name, ino in before.items())  # untouched
    _check_equal(out, reference)
