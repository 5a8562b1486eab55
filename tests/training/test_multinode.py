"""Training across "nodes" on one machine: separate torchrun agents that rendezvous over c10d on
127.0.0.1 (gloo), each with its own worker — then one of them lost (SIGKILL of its whole process
group), restarted, never coming back (``--nnodes 1:2``), and the whole job preempted (SIGTERM).

What each scenario asserts:
- two agents × 1 process give bit-identical weights to one agent × 2 processes (each rank reads
  its own shard, so which agent holds rank 0 does not change the arithmetic);
- a node killed and started again: the survivor's agent restarts its worker (``--max-restarts``),
  both rendezvous again, ``--resume auto`` continues from ``last.pt`` and the final weights are
  bit-identical to the uninterrupted run (the same world size resumes exactly); the steps redone
  are fewer than ``--checkpoint-every``;
- SIGTERM to both agents: every rank agrees on a step, ``last.pt`` is written there, and a
  restart on one node (world size 2 → 1) finishes the run;
- ``--nnodes 1:2`` with a node that never returns: the survivor re-forms the job alone after
  ``last_call_timeout`` and finishes from ``last.pt``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simclr_embed.training.checkpoint import load_checkpoint
from tests.conftest import write_image_folder

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 30, 5
# What deploy/torchrun-multinode.sh exports: with torchrun's default (the rendezvous TCPStore
# shared with the workers) a node that comes back after being lost never completes the next
# rendezvous on torch 2.14 — both agents wait 60 s for keys the other wrote to another store.
RDZV_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(data: Path, out: Path) -> list[str]:
    return ["-m", "simclr_embed.training", "--data", str(data), "--out", str(out),
            "--device", "cpu", "--arch", "resnet18", "--image-size", "32", "--stem", "standard",
            "--proj-dim", "16", "--batch-size", "4", "--max-steps", str(STEPS),
            "--checkpoint-every", str(EVERY), "--keep-checkpoints", "0", "--workers", "0",
            "--log-every", "1", "--no-progress", "--resume", "auto"]  # fmt: skip


class Agent:
    """One torchrun agent in its own session (so a "lost node" is its whole process group)."""

    def __init__(self, log: Path, torchrun: list[str], train: list[str]) -> None:
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
               "PYTHONUNBUFFERED": "1", **RDZV_ENV}  # fmt: skip
        with log.open("ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", *torchrun, *train],
                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"torchrun agent did not finish:\n{self.text()[-3000:]}") from None

    def kill(self) -> None:
        """The node is gone: SIGKILL to the agent and then its workers (torchrun starts each
        worker in a session of its own, so the agent's process group does not hold them)."""
        tree = _descendants(self.proc.pid)
        for pid in [self.proc.pid, *tree]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc: parent ids)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parent.items() if p in frontier]
        found += children
        frontier = children
    return found


def _multinode(nnodes: str, port: int, *extra: str) -> list[str]:
    return ["--nnodes", nnodes, "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"job{port}", *extra]  # fmt: skip


def _wait_for_step(agents: list[Agent], step: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    pattern = re.compile(rf"step {step}/{STEPS}\b")
    while time.monotonic() < deadline:
        if any(pattern.search(a.text()) for a in agents):
            return
        if any(a.proc.poll() is not None for a in agents):
            break
        time.sleep(0.05)
    raise AssertionError(
        f"step {step} never logged:\n" + "\n".join(a.text()[-2000:] for a in agents)
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == STEPS
    return ckpt["model"]


def _resumed_from(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from \S+: step (\d+)", text)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("mn") / "data", per_class=8)


@pytest.fixture(scope="module")
def two_agents(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted two-node run: the reference the fault scenarios are held to."""
    work = tmp_path_factory.mktemp("two")
    port = _port()
    agents = [Agent(work / f"a{i}.log", _multinode("2", port), _train_args(data, work / "out"))
              for i in range(2)]  # fmt: skip
    try:
        assert [a.wait() for a in agents] == [0, 0], agents[0].text()[-3000:]
    finally:
        for a in agents:
            a.kill()
    return work / "out"


def test_two_agents_equal_one_agent_with_two_processes(
    data: Path, two_agents: Path, tmp_path: Path
) -> None:
    one = Agent(tmp_path / "one.log", ["--standalone", "--nproc-per-node", "2"],
                _train_args(data, tmp_path / "out"))  # fmt: skip
    assert one.wait() == 0, one.text()[-3000:]
    single, multi = _weights(tmp_path / "out"), _weights(two_agents)
    assert load_checkpoint(two_agents / "checkpoints" / "last.pt")["config"]["world_size"] == 2
    assert single.keys() == multi.keys()
    for name in single:
        assert torch.equal(single[name], multi[name]), name


def test_a_node_lost_and_restarted_resumes_exactly(
    data: Path, two_agents: Path, tmp_path: Path
) -> None:
    port, out = _port(), tmp_path / "out"
    torchrun = _multinode("2", port, "--max-restarts", "3")
    host = Agent(tmp_path / "host.log", torchrun, _train_args(data, out))
    time.sleep(1.0)  # the host binds the rendezvous store; the other node is the one lost
    lost = Agent(tmp_path / "lost.log", torchrun, _train_args(data, out))
    again = None
    try:
        _wait_for_step([host, lost], 2 * EVERY + 2)
        lost.kill()
        killed_at = max(int(s) for s in re.findall(rf"step (\d+)/{STEPS}", host.text()))
        again = Agent(tmp_path / "again.log", torchrun, _train_args(data, out))
        assert host.wait() == 0, host.text()[-3000:]
        assert again.wait() == 0, again.text()[-3000:]
    finally:
        for a in (host, lost, again):
            if a is not None:
                a.kill()
    log = host.text()
    resumed = _resumed_from(log + again.text())
    assert resumed and resumed[-1] >= killed_at - EVERY, (killed_at, resumed)
    ref = _weights(two_agents)
    for name, value in _weights(out).items():
        assert torch.equal(value, ref[name]), name


def test_preempted_job_continues_on_one_node(data: Path, tmp_path: Path) -> None:
    port, out = _port(), tmp_path / "out"
    agents = [Agent(tmp_path / f"a{i}.log", _multinode("2", port), _train_args(data, out))
              for i in range(2)]  # fmt: skip
    try:
        _wait_for_step(agents, EVERY + 2)
        for a in agents:  # the scheduler preempts the whole job
            a.proc.send_signal(signal.SIGTERM)
        for a in agents:
            a.wait()
    finally:
        for a in agents:
            a.kill()
    stopped = load_checkpoint(out / "checkpoints" / "last.pt")
    assert EVERY + 2 <= stopped["step"] < STEPS and stopped["config"]["world_size"] == 2
    one = Agent(tmp_path / "one.log", ["--standalone", "--nproc-per-node", "1"], _train_args(data, out))  # fmt: skip
    assert one.wait() == 0, one.text()[-3000:]
    assert _resumed_from(one.text()) == [stopped["step"]]
    final = load_checkpoint(out / "checkpoints" / "last.pt")
    assert final["step"] == STEPS and final["config"]["world_size"] == 1


def test_elastic_job_goes_on_without_a_node_that_never_returns(data: Path, tmp_path: Path) -> None:
    port, out = _port(), tmp_path / "out"
    torchrun = _multinode("1:2", port, "--max-restarts", "3", "--rdzv-conf", "last_call_timeout=3")
    host = Agent(tmp_path / "host.log", torchrun, _train_args(data, out))
    time.sleep(0.5)
    lost = Agent(tmp_path / "lost.log", torchrun, _train_args(data, out))
    try:
        _wait_for_step([host, lost], EVERY + 2)
        lost.kill()
        assert host.wait() == 0, host.text()[-3000:]
    finally:
        host.kill()
        lost.kill()
    final = load_checkpoint(out / "checkpoints" / "last.pt")
    assert final["step"] == STEPS and final["config"]["world_size"] == 1
    assert _resumed_from(host.text()), host.text()[-3000:]
