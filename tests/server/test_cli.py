"""``simclr embed`` end to end, and ``python -m simclr_embed.server`` as a process: drain, exit codes, no torch."""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from simclr_embed.cli import main as simclr
from simclr_embed.client import EmbeddingClient
from simclr_embed.imageio import list_images
from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from tests.conftest import write_image_folder
from tests.server.conftest import ServerProcess, ServerThread

REPO = Path(__file__).resolve().parents[2]


def test_embed_cli_on_a_folder(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_image_folder(tmp_path / "imgs", per_class=3, size=40, ext="jpg")
    extra = write_image_folder(tmp_path / "more", per_class=1, size=24, ext="png", classes=("x",))
    out = tmp_path / "out" / "emb.npy"
    code = simclr(
        [
            "embed",
            "--target",
            server.target,
            "--output",
            str(out),
            "--batch",
            "4",
            "--concurrency",
            "2",
            "--kind",
            "projection",
            "--normalize",
            "--no-progress",
            str(folder),
            str(extra / "x" / "0000.png"),
        ]
    )
    assert code == 0
    paths = [*list_images(folder), extra / "x" / "0000.png"]
    assert (out.parent / "emb.npy.paths.txt").read_text().splitlines() == [str(p) for p in paths]
    got = np.load(out)
    assert got.shape == (10, 32) and got.dtype == np.float32
    with EmbeddingClient(server.target) as client:
        want = client.embed(paths, kind="projection", normalize=True)
        version = client.model_info()["model_version"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    printed = capsys.readouterr().out
    assert "N=10" in printed and "D=32" in printed and version in printed
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "emb.npy",
        "emb.npy.files.npy",  # the file record --update compares with
        "emb.npy.json",
        "emb.npy.paths.txt",
    ]  # no temp files, no errors list for a clean run


def test_embed_cli_errors(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_image_folder(tmp_path / "imgs", per_class=2, size=32, classes=("a",))
    (folder / "a" / "0001.png").write_bytes(b"broken")
    out = tmp_path / "o.npy"
    base = ["embed", "--target", server.target, "--output", str(out), "--no-progress"]
    # The default skips it: the good one is written, the bad one listed (test_bulk has more).
    assert simclr([*base, str(folder)]) == 0
    assert "skipped 1 unusable file" in capsys.readouterr().out
    assert np.load(out).shape == (1, 512)
    assert (tmp_path / "o.npy.errors.tsv").read_text().startswith(f"{folder / 'a' / '0001.png'}\t")
    # --on-error fail: exit 1 with a one-line reason naming the file.
    out.unlink()
    assert simclr([*base, "--on-error", "fail", str(folder)]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {folder / 'a' / '0001.png'}: not a ") and len(err.splitlines()) == 1
    )
    assert not out.exists()
    assert simclr(["embed", "--target", server.target, str(tmp_path / "missing")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        simclr(["embed", "--target", server.target, "--batch", "0", str(folder)])
    assert exit_.value.code == 2 and "--batch" in capsys.readouterr().err


def test_serve_bad_flags_exit_2(capsys: pytest.CaptureFixture[str], tiny_onnx: Path) -> None:
    for flags, named in (
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--tls-cert", "c.pem"], "--tls-key"),
        (["--device", "tpu"], "--device"),
    ):
        with pytest.raises(SystemExit) as exit_:
            simclr(["serve", "--model", str(tiny_onnx), *flags])
        assert exit_.value.code == 2
        assert named in capsys.readouterr().err


def test_missing_model_exits_1(tmp_path: Path) -> None:
    server = ServerProcess("--model", str(tmp_path / "nope.onnx"), "--port", "0")
    assert server.wait(timeout=60) == 1
    assert server.log.strip().splitlines()[-1].startswith("error: model file not found")


def test_a_checkpoint_is_refused_before_the_port_opens(tiny_checkpoint: Path) -> None:
    server = ServerProcess("--model", str(tiny_checkpoint), "--port", "0")
    assert server.wait(timeout=60) == 1
    last = server.log.strip().splitlines()[-1]
    assert last.startswith("error:") and "training checkpoint" in last, server.log
    assert f"simclr export-onnx --checkpoint {tiny_checkpoint} --output model.onnx" in last
    assert "--torch-program" in last
    assert "NOT_SERVING" not in server.log and "listening" not in server.log.lower()


def test_a_port_in_use_says_so_in_one_line(server, tiny_onnx: Path) -> None:
    port = server.target.rsplit(":", 1)[1]
    other = ServerProcess("--model", str(tiny_onnx), "--port", port)
    assert other.wait(timeout=60) == 1
    last = other.log.strip().splitlines()[-1]
    assert last.startswith("error: cannot listen on") and "address already in use" in last


def test_device_cuda_without_a_gpu_exits_1(tiny_onnx: Path) -> None:
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this machine has an NVIDIA driver")
    except OSError:
        pass
    server = ServerProcess("--model", str(tiny_onnx), "--port", "0", "--device", "cuda")
    assert server.wait(timeout=60) == 1
    assert re.search(r"^error: --device cuda: no NVIDIA driver", server.log, re.MULTILINE)


def test_sigterm_drains_the_request_in_flight_then_exits_0(tiny_onnx: Path) -> None:
    server = ServerProcess(
        "--model", str(tiny_onnx), "--port", "0", "--metrics-port", "0", "--device", "cpu",
        "--max-batch-size", "8", "--grace-s", "60",
    )  # fmt: skip
    try:
        port = server.wait_serving()
        metrics_port = server.metrics_port()
        stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8).tobytes()
        image = pb.Image(raw=pb.RawImage(pixels=pixels, height=64, width=64, channels=3))
        in_flight = stub.Embed.future(
            pb.EmbedRequest(images=[image] * 1000), timeout=120
        )  # 125 batches
        for _ in range(600):  # SIGTERM once its first batches have run, long before the last
            with urllib.request.urlopen(
                f"http://127.0.0.1:{metrics_port}/metrics", timeout=10
            ) as r:
                m = re.search(r"^simclr_batch_size_count (\S+)", r.read().decode(), re.MULTILINE)
            if m and float(m.group(1)) >= 3:  # the warm-up does not count: it bypasses the batcher
                break
            time.sleep(0.02)
        assert not in_flight.done()  # really in flight when the signal arrives
        server.terminate()
        response = in_flight.result(timeout=120)
        assert len(response.embeddings) == 1000 and response.dimension == 512
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
    assert "draining" in server.log and "stopped" in server.log


def test_server_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "import simclr_embed.server.app, simclr_embed.server.cli, simclr_embed.client.blocking, simclr_embed.embed.cli, simclr_embed.inference.runtime\n"
        "bad = sorted(m for m in ('torch', 'torchvision', 'training', 'export') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_port_in_use_exits_1(tiny_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert (
            simclr(["serve", "--model", str(tiny_onnx), "--port", str(port), "--device", "cpu"])
            == 1
        )
    assert f"error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
