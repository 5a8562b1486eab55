"""``simclr embed`` on a real, messy collection: offline, through a server, through Ray; crashes,
kills and restarts in the middle; bad usage. Every good file's row is checked against that file
embedded alone by a plain ONNX Runtime session (batch 1) on the shared image I/O."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from simclr_embed.cli import main as simclr
from simclr_embed.client.codec import EmbedBatch
from simclr_embed.embed.job import JobConfig, run_job
from simclr_embed.embed.offline import OfflineEmbedder
from simclr_embed.imageio import open_image, to_model_input
from tests.conftest import write_image_folder
from tests.server.collection import write_collection
from tests.server.conftest import REPO, ServerProcess, ServerThread, serve_config

S = 32


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("collection")
    good, bad = write_collection(root)
    return root, good, bad


@pytest.fixture(scope="module")
def alone(collection, tiny_onnx: Path) -> dict[str, np.ndarray]:
    """path → features of that file alone: open_image + the resize policy + session.run(N=1)."""
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    out = {}
    for path in collection[1]:
        x = to_model_input(open_image(path), S, "resize")[None]  # [1, S, S, 3]
        out[str(path)] = session.run(["features"], {"images": x})[0][0]
    return out


def _check_output(out: Path, collection, alone: dict[str, np.ndarray]) -> None:
    """The .npy run wrote exactly the good files, in path order, each as when embedded alone."""
    _, good, bad = collection
    paths = (out.parent / (out.name + ".paths.txt")).read_text().splitlines()
    assert paths == [str(p) for p in good]
    vectors = np.load(out)
    assert vectors.shape == (len(good), 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, np.stack([alone[p] for p in paths]), rtol=1e-5, atol=1e-5)
    errors = (out.parent / (out.name + ".errors.tsv")).read_text().splitlines()
    assert [line.split("\t")[0] for line in errors] == [str(p) for p in bad]
    reasons = dict(line.split("\t") for line in errors)
    assert all(reasons.values())
    assert "cannot read file" in next(r for p, r in reasons.items() if "dangling" in p)
    assert "pixels" in next(r for p, r in reasons.items() if "bomb" in p)
    assert "starts like a TIFF file" in next(r for p, r in reasons.items() if "layout" in p)


def _parquet(folder: Path) -> tuple[list[str], np.ndarray, dict[bytes, bytes]]:
    import pyarrow.dataset as ds

    table = ds.dataset(folder, format="parquet").to_table()
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    return table.column("path").to_pylist(), vectors, table.schema.metadata


def test_offline_skips_and_lists_bad_files(collection, alone, tiny_onnx, tmp_path, capsys) -> None:
    root, good, bad = collection
    out = tmp_path / "out.npy"
    assert simclr(["embed", "--model", str(tiny_onnx), "--output", str(out), "--no-progress",
                   "--batch", "7", str(root)]) == 0  # fmt: skip
    _check_output(out, collection, alone)
    printed = capsys.readouterr().out
    assert f"N={len(good)}" in printed and f"skipped {len(bad)}" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out.npy", "out.npy.errors.tsv", "out.npy.files.npy", "out.npy.json", "out.npy.paths.txt",
    ]  # fmt: skip


def test_through_the_server_npy_and_parquet(collection, alone, tiny_onnx, tmp_path) -> None:
    root, good, _ = collection
    srv = ServerThread(serve_config(tiny_onnx, max_batch_size=8))
    try:
        base = ["embed", "--target", srv.target, "--no-progress", "--batch", "5", str(root)]
        assert simclr([*base, "--output", str(tmp_path / "out.npy")]) == 0
        _check_output(tmp_path / "out.npy", collection, alone)
        assert simclr([*base, "--output", str(tmp_path / "pq"), "--concurrency", "3"]) == 0
    finally:
        srv.close()
    paths, vectors, meta = _parquet(tmp_path / "pq")
    assert paths == [str(p) for p in good]
    np.testing.assert_array_equal(vectors, np.load(tmp_path / "out.npy"))
    version = onnx.load(str(tiny_onnx)).metadata_props
    want = next(p.value for p in version if p.key == "simclr.model_version")
    assert meta[b"simclr.model_version"] == f'"{want}"'.encode()
    assert (tmp_path / "pq.errors.tsv").read_text() == (tmp_path / "out.npy.errors.tsv").read_text()


@pytest.mark.slow
def test_ray_pipeline_matches_offline(collection, tiny_onnx, tmp_path) -> None:
    """A real local Ray (2 CPUs), as a separate process; nothing of Ray is left running."""
    root, good, _ = collection
    offline = tmp_path / "off.npy"
    assert simclr(["embed", "--model", str(tiny_onnx), "--output", str(offline), "--no-progress", str(root)]) == 0  # fmt: skip
    out = tmp_path / "ray"
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "simclr_embed.cli", "embed", "--ray", "--model", str(tiny_onnx),
         "--format", "parquet", "--output", str(out), "--batch", "16", "--no-progress", str(root)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths, vectors, _ = _parquet(out)
    assert paths == [str(p) for p in good]
    np.testing.assert_allclose(vectors, np.load(offline), rtol=1e-5, atol=1e-5)
    errors = tmp_path / "ray.errors.tsv"
    assert errors.read_text() == (tmp_path / "off.npy.errors.tsv").read_text()
    left = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout


def test_on_error_fail_stops_at_the_first_bad_file(collection, tiny_onnx, tmp_path, capsys) -> None:
    root, _, bad = collection
    out = tmp_path / "out.npy"
    code = simclr(["embed", "--model", str(tiny_onnx), "--output", str(out), "--on-error", "fail", "--no-progress", str(root)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: {bad[0]}: ") and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """480 small PNGs: long enough to be killed half-way."""
    return write_image_folder(tmp_path_factory.mktemp("many"), per_class=160, size=24)


def _embed_proc(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "simclr_embed.cli", "embed", "--no-progress", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_commits(journal: Path, n: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not (journal.exists() and journal.read_text().count("\n") >= n):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "no progress"
        time.sleep(0.002)


def test_kill_9_then_resume_gives_the_same_bytes(many, tiny_onnx, tmp_path) -> None:
    whole, out = tmp_path / "whole.npy", tmp_path / "out.npy"
    common = ["--model", str(tiny_onnx), "--batch", "8", "--part-size", "24", str(many)]
    assert simclr(["embed", "--no-progress", "--output", str(whole), *common]) == 0
    for attempt in range(3):  # the run must be caught in the middle; it is short
        proc = _embed_proc("--output", str(out), *common)
        _wait_commits(out.with_name("out.npy.partial") / "journal.jsonl", 2 + attempt, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if not out.exists():
            break
        out.unlink()
    assert not out.exists() and out.with_name("out.npy.partial").is_dir()  # written as it goes
    committed = np.load(out.with_name("out.npy.partial") / "vectors.npy", mmap_mode="r")
    assert committed.shape[0] == 0  # the header still says [0, D]: only the end gives it rows
    assert simclr(["embed", "--no-progress", "--output", str(out), "--resume", *common]) == 0
    for suffix in ("", ".paths.txt"):
        assert Path(f"{out}{suffix}").read_bytes() == Path(f"{whole}{suffix}").read_bytes()
    assert not out.with_name("out.npy.partial").exists()


class _Crash(Exception):
    pass


def test_a_torn_part_is_never_read_back(many, tiny_onnx, tmp_path) -> None:
    """A crash mid-part leaves bytes past the last commit (vectors, paths, a torn journal line):
    resume cuts them off and ends byte-identical to an uninterrupted run, npy and parquet."""
    for fmt, name in (("npy", "x.npy"), ("parquet", "x")):
        whole, out = tmp_path / f"whole-{name}", tmp_path / name
        with OfflineEmbedder(tiny_onnx, device="cpu", batch=8) as engine:
            cfg = JobConfig((many,), whole, fmt, part_size=40)
            run_job(cfg, engine)
            with pytest.raises(_Crash):
                crash = _crash_after(200)
                run_job(JobConfig((many,), out, fmt, part_size=40), engine, on_batch=crash)
            state = out.with_name(name + ".partial") if fmt == "npy" else out
            journal = state / ("journal.jsonl" if fmt == "npy" else "_simclr_journal.jsonl")
            with open(journal, "ab") as f:
                f.write(b'{"inputs": 99999, "tor')  # a kill while writing the commit line
            if fmt == "npy":
                for file in ("vectors.npy", "paths.txt", "errors.tsv"):
                    with open(state / file, "ab") as f:
                        f.write(b"\x01half a part\n")
            else:
                (state / "part-000099.parquet").write_bytes(b"renamed, never journaled")
                (state / ".part-000005.parquet.tmp").write_bytes(b"half written")
            run_job(JobConfig((many,), out, fmt, resume=True, part_size=40), engine)
        if fmt == "npy":
            assert out.read_bytes() == whole.read_bytes()
            assert Path(f"{out}.paths.txt").read_text() == Path(f"{whole}.paths.txt").read_text()
        else:
            a, b = _parquet(out), _parquet(whole)
            assert a[0] == b[0] and np.array_equal(a[1], b[1])
            assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())


def test_server_restart_mid_run_loses_nothing(many, tiny_onnx, tmp_path) -> None:
    whole, out = tmp_path / "whole.npy", tmp_path / "out.npy"
    common = ["--batch", "8", "--part-size", "24", str(many)]
    assert simclr(["embed", "--no-progress", "--model", str(tiny_onnx), "--output", str(whole), *common]) == 0  # fmt: skip
    args = ("--model", str(tiny_onnx), "--device", "cpu", "--drain-delay-s", "0.2")
    first = ServerProcess(*args, "--port", "0")
    second = None
    try:
        port = first.wait_serving()
        proc = _embed_proc("--target", f"127.0.0.1:{port}", "--output", str(out), *common)
        _wait_commits(out.with_name("out.npy.partial") / "journal.jsonl", 2, proc)
        first.terminate()
        assert first.wait(30) == 0
        second = ServerProcess(*args, "--port", str(port))
        second.wait_serving()
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert out.read_bytes() == whole.read_bytes()
        assert Path(f"{out}.paths.txt").read_text() == Path(f"{whole}.paths.txt").read_text()
    finally:
        first.kill()
        if second is not None:
            second.terminate()
            second.wait(30)


def test_bad_usage_harms_nothing(many, tiny_onnx, tmp_path, capsys) -> None:
    out = tmp_path / "out.npy"
    base = ["embed", "--no-progress", "--output", str(out), str(many)]
    for extra, named in (
        (["--ray", "--format", "parquet"], "--ray needs --model"),
        (["--model", str(tiny_onnx), "--format", "parquet"], "--format parquet writes a folder"),
        (["--model", str(tiny_onnx), "--ray"], "--ray writes Parquet"),
        (["--model", str(tiny_onnx), "--batch", "0"], "--batch"),
    ):
        with pytest.raises(SystemExit) as exit_:
            simclr([*base, *extra])
        assert exit_.value.code == 2 and named in capsys.readouterr().err
    # An interrupted run of one model cannot be continued with another.
    other = tmp_path / "other.onnx"
    proto = onnx.load(str(tiny_onnx))
    for p in proto.metadata_props:
        if p.key == "simclr.model_version":
            p.value = "0123456789abcdef"
    onnx.save(proto, str(other))
    with OfflineEmbedder(tiny_onnx, device="cpu", batch=8) as engine, pytest.raises(_Crash):
        run_job(JobConfig((many,), out, part_size=16), engine, on_batch=_crash_after(64))
    state = out.with_name("out.npy.partial")
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    assert simclr([*base, "--model", str(other), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "model_version" in err and "nothing was changed" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    # The same model continues it; a second --resume finds it complete.
    assert simclr([*base, "--model", str(tiny_onnx), "--resume"]) == 0
    assert simclr([*base, "--model", str(tiny_onnx), "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    # A folder this tool did not write is never cleared.
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "keep.jpg").write_bytes(b"precious")
    assert simclr(["embed", "--model", str(tiny_onnx), "--output", str(photos), str(many)]) == 1
    assert (photos / "keep.jpg").read_bytes() == b"precious"


def _crash_after(n: int):
    seen = [0]

    def hook(batch: EmbedBatch) -> None:
        seen[0] += batch.count
        if seen[0] >= n:
            raise _Crash

    return hook
