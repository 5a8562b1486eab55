"""``simclr serve --processes N``: real worker processes on one port, one /metrics, one drain.

Which worker holds a connection is read from the kernel (``/proc``), not from the server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from simclr_embed.server.config import build_parser, config_from_args
from simclr_embed.server.group import worker_argv
from tests.server.conftest import ServerProcess, reference

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")

S = 32
CHANNELS = 32


def _start(model: Path, *extra: str) -> tuple[ServerProcess, int, list[int]]:
    group = ServerProcess(
        "--model", str(model), "--port", "0", "--device", "cpu", "--processes", "2",
        "--drain-delay-s", "0.3", "--grace-s", "5", *extra,
    )  # fmt: skip
    port = group.wait_serving()
    found = dict(re.findall(r"ready \(worker (\d)/2, pid (\d+)\)", group.log))
    assert sorted(found) == ["0", "1"], group.log
    return group, port, [int(found[i]) for i in ("0", "1")]  # by worker index


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _connections_per_pid(port: int, pids: list[int]) -> dict[int, int]:
    """Established TCP connections on the server's side of ``port``, by owning process."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # 01 = ESTABLISHED
                inodes.add(fields[9])
    counts = {}
    for pid in pids:
        owned = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                owned += 1
        counts[pid] = owned
    return counts


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _sample(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert found, f"{name}{labels} not in metrics"
    return float(found.group(1))


def test_worker_argv_lets_the_group_settings_win() -> None:
    parser = build_parser()
    user = ["--model", "m.onnx", "--proc=2", "--port", "7000", "--metrics-port=9000"]
    cfg = config_from_args(parser.parse_args(user), parser)
    assert cfg.processes == 2  # abbreviated and --flag=value forms are the user's to use
    argv = worker_argv(user, cfg, 7001, 1, Path("/tmp/ready-1"))
    worker = config_from_args(parser.parse_args(argv), parser)
    assert (worker.port, worker.worker, worker.processes) == (7001, (1, 2), 1)
    assert worker.ready_file == Path("/tmp/ready-1")
    assert worker.decode_threads >= 1 and worker.intra_op_threads >= 1
    mine = [*user, "--decode-threads", "3"]
    kept = config_from_args(parser.parse_args(mine), parser)
    again = worker_argv(mine, kept, 7001, 0, Path("r"))
    assert config_from_args(parser.parse_args(again), parser).decode_threads == 3  # not split
    with pytest.raises(SystemExit) as exc:
        config_from_args(parser.parse_args(["--model", "m", "--processes", "0"]), parser)
    assert exc.value.code == 2


def test_two_processes_share_the_port_count_together_and_drain(
    tiny_onnx: Path, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    group, port, pids = _start(
        tiny_onnx, "--metrics-port", "0", "--ready-file", str(ready), "--http-port", "0"
    )
    channels: list[grpc.Channel] = []
    try:
        assert ready.exists()
        assert group.log.count("SERVING on") == 1, group.log
        session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        images = 0
        for i in range(CHANNELS):
            # A channel of its own each (no shared subchannel): a new TCP connection, which the
            # kernel hands to one of the two listening workers.
            channel = grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            channels.append(channel)
            batch = rng.integers(0, 256, (1 + i % 3, S, S, 3), dtype=np.uint8)
            request = pb.EmbedRequest(
                images=[
                    pb.Image(raw=pb.RawImage(pixels=im.tobytes(), height=S, width=S, channels=3))
                    for im in batch
                ]
            )
            reply = pb_grpc.EmbeddingServiceStub(channel).Embed(request, timeout=30)
            got = np.array([e.values for e in reply.embeddings], dtype=np.float32)
            np.testing.assert_allclose(got, reference(session, batch)["features"], atol=1e-4)
            images += len(batch)
        per_worker = _connections_per_pid(port, pids)
        assert sum(per_worker.values()) == CHANNELS, per_worker
        assert all(n > 0 for n in per_worker.values()), per_worker  # 2**-31 to fail by chance

        # The group's one HTTP port (SO_REUSEPORT too): two calls on new connections.
        http_port = int(re.findall(r"HTTP on 127\.0\.0\.1:(\d+) \(2 processes\)", group.log)[0])
        body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                       "shape": [1, S, S, 3], "data": [7] * (S * S * 3)}]})  # fmt: skip
        for _ in range(2):
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v2/models/simclr/infer", data=body.encode()
            )
            with urllib.request.urlopen(request, timeout=30) as r:
                assert json.loads(r.read())["outputs"][0]["shape"] == [1, 512]
        images += 2

        text = _scrape(group.metrics_port())  # one endpoint, summed over both workers
        assert _sample(text, "simclr_requests_total", '{code="OK",protocol="grpc"}') == CHANNELS
        assert _sample(text, "simclr_requests_total", '{code="OK",protocol="v2-http"}') == 2
        assert _sample(text, "simclr_images_total") == images
        assert _sample(text, "simclr_queue_images") == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30) as r:
            whole = r.read().decode()  # the HTTP port's /metrics is the group's view too
        assert _sample(whole, "simclr_requests_total", '{code="OK",protocol="v2-http"}') == 2
        assert _sample(whole, "simclr_images_total") == images
    finally:
        for channel in channels:
            channel.close()
        group.terminate()
    assert group.wait(30) == 0, group.log
    assert _wait_gone(pids, 10), group.log
    assert group.log.count("stopped; Embed calls answered") == 2, group.log
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nobody holds the port any more


def test_a_worker_that_dies_stops_the_group(tiny_onnx: Path) -> None:
    group, _, pids = _start(tiny_onnx)
    try:
        os.kill(pids[0], signal.SIGKILL)
        assert group.wait(30) == 1, group.log  # the orchestrator restarts it: not half a server
        assert "worker 0/2 exited with -9" in group.log
        assert _wait_gone(pids, 10)
    finally:
        group.kill()


def test_workers_leave_when_the_supervisor_is_killed(tiny_onnx: Path) -> None:
    group, _, pids = _start(tiny_onnx)
    try:
        group.proc.kill()  # SIGKILL: no forwarding; the workers must notice by themselves
        group.proc.wait(10)
        assert _wait_gone(pids, 20), group.log
        group.wait(10)
        assert "is gone: draining" in group.log
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
