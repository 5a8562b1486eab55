"""The demo end to end (scaled down), its kNN score, its output-folder safety, and its clean-up."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest

from simclr_embed.demo.pipeline import MARKER, main, prepare_out
from simclr_embed.demo.steps import knn_agreement, serve_and_embed
from simclr_embed.errors import SimclrError


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path, capsys) -> None:
    """Real train → export → serve → embed → report on 32 generated images, 2 training steps."""
    import onnxruntime as ort

    from simclr_embed.imageio import list_images, open_image, to_model_input

    out = tmp_path / "demo"
    argv = ["--out", str(out), "--per-class", "4", "--sample-size", "32", "--steps", "2",
            "--batch-size", "16", "--workers", "0", "--k", "3"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "simclr-embed demo report" in printed and "kNN agreement" in printed

    report = json.loads((out / "report.json").read_text())
    for name in ("trained", "untrained"):
        run = report["runs"][name]
        assert run["server_exit_code"] == 0  # SIGTERM → drained → exit 0
        assert run["n"] == 32 and run["dim"] == 512 and run["images_per_s"] > 0
        assert run["knn"]["classes"] == 8 and run["knn"]["queries"] == 8
        assert 0.0 <= run["knn"]["top1"] <= 1.0
    assert report["runs"]["trained"]["version"] != report["runs"]["untrained"]["version"]
    from PIL import Image

    from simclr_embed.neighbors.sheet import PAD, TITLE, sheet_size

    width, height = sheet_size(6, 3 + 1)  # 6 sampled images, each with its k = 3 neighbours
    with Image.open(report["neighbors_png"]) as sheet:  # trained and untrained side by side
        assert sheet.size == (2 * width + PAD, TITLE + height)
    assert "neighbors.png" in printed

    # The served vectors are the model's own: compare with a direct ONNX Runtime run.
    vectors = np.load(out / "embeddings" / "trained.npy")
    listed = (out / "embeddings" / "trained.npy.paths.txt").read_text().splitlines()
    images = list_images(out / "data")
    assert [Path(p).resolve() for p in listed] == [p.resolve() for p in images]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.stack([to_model_input(open_image(p), 32, "resize") for p in images])
    (direct,) = session.run(["features"], {"images": batch})
    np.testing.assert_allclose(vectors, direct, rtol=1e-4, atol=1e-4)
    for log in (out / "logs").iterdir():  # both servers really went away
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text()).group(1))
        assert _port_is_free(port)


def test_knn_agreement_against_known_answers(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    paths = [str(tmp_path / n / f"{i}.png") for n in names for i in range(8)]
    y = np.repeat(np.arange(3), 8)
    rng = np.random.default_rng(0)
    separable = np.eye(3)[y] * 10 + rng.normal(0, 0.1, (24, 3))  # one direction per class
    r = knn_agreement(separable.astype(np.float32), paths, tmp_path, k=3)
    assert r is not None and r["top1"] == 1.0 and r["queries"] == 6 and r["bank"] == 18
    assert r["chance"] == pytest.approx(1 / 3)
    # Rows permuted so that neighbours' labels are unrelated to the query's: around chance.
    scrambled = separable[rng.permutation(24)].astype(np.float32)
    assert knn_agreement(scrambled, paths, tmp_path, k=3)["top1"] < 0.7
    flat = [str(tmp_path / f"{i}.png") for i in range(24)]  # no class folders: no score
    assert knn_agreement(separable.astype(np.float32), flat, tmp_path, k=3) is None


def test_prepare_out_only_replaces_its_own_folder(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    prepare_out(out, None)
    (out / "old.txt").write_text("previous run")
    prepare_out(out, None)  # a previous demo folder: replaced
    assert (out / MARKER).exists() and not (out / "old.txt").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(SimclrError, match="not made by the demo"):
        prepare_out(mine, None)
    assert (mine / "thesis.tex").read_text() == "precious"
    with pytest.raises(SimclrError, match="contains --data"):
        prepare_out(tmp_path, tmp_path / "images")


@pytest.mark.slow
def test_server_is_stopped_when_a_step_fails(tiny_onnx: Path, tmp_path: Path) -> None:
    """``simclr embed`` fails (its folder is gone) → the error surfaces, the server exits 0."""
    data = tmp_path / "vanished"
    with pytest.raises(SimclrError, match="simclr embed"):
        serve_and_embed("x", tiny_onnx, data, tmp_path / "out", device="cpu", k=3,
                        startup_timeout_s=120)  # fmt: skip
    log = (tmp_path / "out" / "logs" / "serve-x.log").read_text()
    assert "draining" in log and "stopped" in log  # it got SIGTERM and drained
    port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", log).group(1))
    assert _port_is_free(port)


def test_a_budgeted_report_says_the_steps_reached_and_what_the_budget_gives_elsewhere() -> None:
    from simclr_embed.demo.pipeline import REFERENCE_RATES, _budget_lines

    plan = {"budget_s": 180.0, "images_per_s": 126.0, "total_steps": 170}
    (line,) = _budget_lines({"plan": plan})
    assert "time budget 3 min at 126 img/s (measured) → 170 steps" in line
    for name, rate in REFERENCE_RATES:  # steps scale with the rate: 170 × rate / 126
        assert f"~{round(170 * rate / 126)} steps on {name} ({rate:.0f} img/s)" in line
    assert _budget_lines({"plan": None}) == []
