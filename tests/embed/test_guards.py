"""What a new user hit (issue 20, items 1 and 2): one output, one model; nothing overwritten.

Real servers (``python -m simclr_embed.server`` processes) replaced mid-run by one serving another
model on the same port — unary and stream, one target and several — and the bulk job the CLI
runs; then the CLI's ``--resume`` with each model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from simclr_embed.cli import main as simclr
from simclr_embed.embed.cli import open_engine
from simclr_embed.embed.job import JobConfig, ModelChangedError, run_job
from tests.conftest import write_image_folder
from tests.embed.conftest import OTHER_VERSION
from tests.server.conftest import ServerProcess


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 small PNGs: 60 batches of 4."""
    return write_image_folder(tmp_path_factory.mktemp("photos"), per_class=80, size=24)


@pytest.fixture(scope="module")
def whole(photos: Path, tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the whole folder embedded offline with model A."""
    out = tmp_path_factory.mktemp("whole") / "whole.npy"
    assert simclr(["embed", "--no-progress", "--model", str(tiny_onnx), "--output", str(out), str(photos)]) == 0  # fmt: skip
    return out


def _serve(model: Path, port: int = 0) -> tuple[ServerProcess, int]:
    srv = ServerProcess("--model", str(model), "--device", "cpu", "--drain-delay-s", "0.1",
                        "--port", str(port))  # fmt: skip
    return srv, srv.wait_serving()


@pytest.mark.parametrize(
    ("stream", "replicas"),
    [(True, 1), (False, 1), (False, 2), (True, 2)],
    ids=["stream", "unary", "2-targets-unary", "2-targets-stream"],
)
def test_a_server_redeployed_with_another_model_stops_the_job(
    photos: Path, tiny_onnx: Path, other_onnx: Path, whole: Path, tmp_path: Path,
    stream: bool, replicas: int,
) -> None:  # fmt: skip
    out = tmp_path / "out.npy"
    servers = [_serve(tiny_onnx) for _ in range(replicas)]
    started: list[ServerProcess] = [s for s, _ in servers]
    target = ",".join(f"127.0.0.1:{port}" for _, port in servers)
    swapped = []

    def swap(batch) -> None:
        if swapped:
            # Two targets: the channel reconnects to the new replica within its reconnect backoff
            # (1 s, ×1.6); until then replica 1 answers. Pace the rest so that B is reached.
            time.sleep(0.25 if replicas > 1 else 0)
            return
        # SIGTERM (drain), then model B on the same port. Unary calls round-robin over the
        # replicas, so replacing one is enough; a stream stays on its replica until it ends,
        # so there every replica is redeployed (a rolling deploy's end state).
        for old, port in servers[-1:] if not stream else servers:
            old.terminate()
            assert old.wait(30) == 0
            new, _ = _serve(other_onnx, port)
            started.append(new)
        swapped.append(batch.start)

    cfg = JobConfig((photos,), out, "npy", part_size=16, source=f"the server at {target}")
    try:
        engine = open_engine(target, None, batch=4, concurrency=2, stream=stream, wait_s=30)
        try:
            with pytest.raises(ModelChangedError) as err:
                run_job(cfg, engine, on_batch=swap)
        finally:
            engine.close()
    finally:
        for srv in started:
            srv.kill()
    message = str(err.value)
    assert f"now serves model {OTHER_VERSION}" in message and target in message
    state = out.with_name("out.npy.partial")
    job = json.loads((state / "job.json").read_text())
    assert job["model_version"] != OTHER_VERSION
    assert f"model {job['model_version']}" in message and "--resume" in message
    # Every committed row is model A's vector of its file (the offline reference), in order.
    entries = [json.loads(line) for line in (state / "journal.jsonl").read_text().splitlines()]
    rows = entries[-1]["rows"]
    assert rows >= 4  # at least the batch before the swap
    ref = np.load(whole)
    got = np.frombuffer(
        (state / "vectors.npy").read_bytes()[-rows * ref.shape[1] * 4 :], "<f4"
    ).reshape(rows, -1)
    np.testing.assert_allclose(got, ref[:rows], rtol=1e-4, atol=1e-5)
    assert not out.exists()  # nothing finished, nothing of model B anywhere


def test_resume_refuses_the_other_model_and_continues_with_the_first(
    photos: Path, tiny_onnx: Path, other_onnx: Path, whole: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out.npy"
    srv, port = _serve(tiny_onnx)
    try:
        cfg = JobConfig((photos,), out, "npy", part_size=16)
        engine = open_engine(f"127.0.0.1:{port}", None, batch=8)

        class Stop(Exception):
            pass

        def stop_after_three(batch) -> None:
            if batch.start >= 24:
                raise Stop

        with pytest.raises(Stop):
            run_job(cfg, engine, on_batch=stop_after_three)
        engine.close()
    finally:
        srv.kill()
    base = ["embed", "--no-progress", "--output", str(out), str(photos)]
    b, b_port = _serve(other_onnx)
    try:
        assert simclr([*base, "--target", f"127.0.0.1:{b_port}", "--resume"]) == 1
        err = capsys.readouterr().err
        assert "serve model" in err and OTHER_VERSION in err and "nothing was changed" in err
        # Forgetting --resume does not silently start over either.
        assert simclr([*base, "--target", f"127.0.0.1:{b_port}"]) == 1
        err = capsys.readouterr().err
        assert "an unfinished run" in err and "--resume" in err and "--overwrite" in err
    finally:
        b.kill()
    a, a_port = _serve(tiny_onnx)
    try:
        assert simclr([*base, "--target", f"127.0.0.1:{a_port}", "--resume"]) == 0
    finally:
        a.kill()
    captured = capsys.readouterr()
    assert "resuming" in captured.err and "inputs already done" in captured.err
    assert out.read_bytes() == whole.read_bytes()


def test_an_existing_output_is_refused_unless_resume_or_overwrite(
    photos: Path, tiny_onnx: Path, other_onnx: Path, whole: Path, tmp_path: Path, capsys
) -> None:
    done = tmp_path / "done.npy"
    small = tmp_path / "small"
    small.mkdir()
    for p in sorted(photos.rglob("*.png"))[:7]:
        (small / p.name).write_bytes(p.read_bytes())
    for suffix in ("", ".paths.txt", ".json"):
        Path(f"{done}{suffix}").write_bytes(Path(f"{whole}{suffix}").read_bytes())
    before = done.read_bytes()
    base = ["embed", "--no-progress", "--model", str(other_onnx), "--output", str(done), str(small)]
    assert simclr(base) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    assert "a finished embedding: 240 rows of model" in err and "--overwrite" in err
    assert done.read_bytes() == before
    # --overwrite replaces it, with the new model's 7 rows.
    assert simclr([*base, "--overwrite"]) == 0
    assert np.load(done).shape[0] == 7
    assert json.loads(Path(f"{done}.json").read_text())["model_version"] == OTHER_VERSION
    with pytest.raises(SystemExit) as exit_:
        simclr([*base, "--overwrite", "--resume"])
    assert exit_.value.code == 2


def test_overwrite_of_a_parquet_folder_keeps_the_old_one_until_the_new_is_complete(
    photos: Path, tiny_onnx: Path, other_onnx: Path, tmp_path: Path
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "emb"
    args = ["embed", "--no-progress", "--format", "parquet", "--output", str(out), str(photos)]
    assert simclr([*args, "--model", str(tiny_onnx)]) == 0
    old = pq.read_table(out)

    class Crash(Exception):
        pass

    def crash(batch) -> None:
        # Mid-way through the replacement the old folder is still whole and readable.
        assert pq.read_table(out).equals(old)
        raise Crash

    from simclr_embed.embed.offline import OfflineEmbedder

    cfg = JobConfig((photos,), out, "parquet", overwrite=True)
    with OfflineEmbedder(other_onnx, device="cpu", batch=8) as engine, pytest.raises(Crash):
        run_job(cfg, engine, on_batch=crash)
    assert pq.read_table(out).equals(old)
    assert simclr([*args, "--model", str(other_onnx), "--overwrite"]) == 0
    new = pq.read_table(out)
    assert new.num_rows == old.num_rows and not new.equals(old)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left


def test_a_ray_actor_refuses_a_model_file_replaced_after_the_job_started(
    tiny_onnx: Path, other_onnx: Path, tmp_path: Path
) -> None:
    """Each Ray actor opens the model file itself: if it now holds another model, the actor
    refuses to start (Ray then fails the job) instead of writing that model's vectors."""
    from simclr_embed.embed.ray_job import Embed
    from simclr_embed.errors import SimclrError
    from simclr_embed.inference.runtime import open_runtime

    version = open_runtime(tiny_onnx, device="cpu", max_batch_size=1).info.model_version
    job = {"model_version": version, "dimension": 512}
    Embed(str(tiny_onnx), "cpu", 4, "features", False, job, str(tmp_path))  # its own model: fine
    with pytest.raises(SimclrError, match=f"now holds model {OTHER_VERSION}.*started with model {version}"):  # fmt: skip
        Embed(str(other_onnx), "cpu", 4, "features", False, job, str(tmp_path))
