"""``simclr evaluate`` end to end on generated labeled folders where the answer is known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simclr_embed.cli import main as simclr
from tests.conftest import write_image_folder

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def write_colour_folder(root: Path, per_class: int, seed: int, shuffle: bool = False) -> Path:
    """8×8 noisy images whose class is their colour; ``shuffle`` files them under random classes."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    for i in range(per_class * len(names)):
        colour = COLOURS[names[i % len(names)]]
        folder = names[int(rng.integers(len(names)))] if shuffle else names[i % len(names)]
        arr = np.clip(np.array(colour) + rng.normal(0, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / folder / f"{i:04d}.png")
    return root


def run_eval(args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "eval.json"
    assert simclr(["evaluate", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_checkpoint_and_onnx_report_the_same_numbers(
    tiny_checkpoint: Path,
    tiny_onnx: Path,
    image_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # val = train and k = 1: every image's nearest neighbour is itself (cosine 1), so kNN must be
    # 100%; 512-d features of 24 images are linearly separable, so the probe is 100% too.
    args = [
        "--train",
        str(image_folder),
        "--val",
        str(image_folder),
        "--k",
        "1",
        "--probe-epochs",
        "200",
        "--probe-l2",
        "1e-3",
        "--device",
        "cpu",
    ]
    pt = run_eval(["--model", str(tiny_checkpoint), *args], tmp_path)
    printed = capsys.readouterr().out
    assert "kNN top-1" in printed and "100.00%" in printed and "probe top-1" in printed
    onnx = run_eval(["--model", str(tiny_onnx), *args], tmp_path)
    for r in (pt, onnx):
        assert r["knn"] == {"top1": 1.0, "k": 1, "temperature": 0.07}
        assert r["probe"]["top1"] == 1.0
        assert r["num_train"] == r["num_val"] == 24 and r["feature_dim"] == 512
        assert r["classes"] == ["circle", "square", "stripes"]


def test_pixels_separate_colour_classes_and_shuffled_labels_give_chance(tmp_path: Path) -> None:
    train = write_colour_folder(tmp_path / "train", per_class=30, seed=1)
    val = write_colour_folder(tmp_path / "val", per_class=20, seed=2)
    r = run_eval(
        ["--model", "pixels", "--image-size", "8", "--train", str(train), "--val", str(val)],
        tmp_path,
    )
    assert r["knn"]["top1"] == 1.0 and r["probe"]["top1"] == 1.0 and r["feature_dim"] == 192
    assert r["probe"]["l2_auto"] and set(r["probe"]["l2_heldout_top1"]) == {
        "1",
        "0.1",
        "0.01",
        "0.001",
        "0.0001",
    }

    strain = write_colour_folder(tmp_path / "strain", per_class=60, seed=3, shuffle=True)
    sval = write_colour_folder(tmp_path / "sval", per_class=60, seed=4, shuffle=True)
    r = run_eval(
        [
            "--model",
            "pixels",
            "--image-size",
            "8",
            "--train",
            str(strain),
            "--val",
            str(sval),
            "--probe-epochs",
            "100",
            "--probe-l2",
            "0.1",
        ],
        tmp_path,
    )
    # 180 val images, chance 1/3: one standard error is 0.035.
    assert 0.2 < r["knn"]["top1"] < 0.47 and 0.2 < r["probe"]["top1"] < 0.47


@pytest.mark.parametrize(
    "bad",
    [
        ["--k", "0"],
        ["--probe-epochs", "-1"],
        ["--batch-size", "0"],
        ["--model", "model.bin"],
        ["--device", "tpu"],
        ["--knn-temperature", "0"],
        ["--probe-l2", "-1"],
        ["--probe-l2", "strong"],
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    bad: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model", "pixels", "--train", str(tmp_path), "--val", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        simclr(["evaluate", *args, *bad])
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err


def _folders(tmp_path: Path, case: str) -> tuple[str, str, str]:
    """(model, train, val) for each runtime-failure case."""
    good = write_image_folder(tmp_path / "good", per_class=2)
    if case == "mismatched":
        other = write_image_folder(tmp_path / "other", per_class=2, classes=("circle", "dots"))
        return "pixels", str(good), str(other)
    if case == "single":
        single = write_image_folder(tmp_path / "single", per_class=2, classes=("circle",))
        return "pixels", str(good), str(single)
    if case == "unlabeled":
        flat = tmp_path / "flat"
        flat.mkdir()
        for p in sorted(good.rglob("*.png")):
            p.rename(flat / f"{p.parent.name}-{p.name}")
        return "pixels", str(flat), str(flat)
    if case == "missing_folder":
        return "pixels", str(tmp_path / "nope"), str(good)
    if case == "missing_checkpoint":
        return str(tmp_path / "last.pt"), str(good), str(good)
    if case == "corrupt_checkpoint":
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
        return str(tmp_path / "bad.pt"), str(good), str(good)
    if case == "missing_onnx":
        return str(tmp_path / "model.onnx"), str(good), str(good)
    assert case == "corrupt_image"
    (good / "circle" / "zz.png").write_bytes(b"broken")
    return "pixels", str(good), str(good)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("mismatched", "different classes"),
        ("single", "single class"),
        ("unlabeled", "no class subfolders"),
        ("missing_folder", "not a folder"),
        ("missing_checkpoint", "checkpoint not found"),
        ("corrupt_checkpoint", "cannot read"),
        ("missing_onnx", "model not found"),
        ("corrupt_image", "zz.png"),
    ],
)
def test_runtime_failures_exit_1_with_one_line(
    case: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, train, val = _folders(tmp_path, case)
    out = tmp_path / "out.json"
    assert (
        simclr(["evaluate", "--model", model, "--train", train, "--val", val, "--json", str(out)])
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()


def test_module_entry_point_exit_codes(tmp_path: Path) -> None:
    # Exit 1 goes through the same run_main as above; here the module form and argparse's 2.
    good = write_image_folder(tmp_path / "good", per_class=2)
    base = [
        sys.executable,
        "-m",
        "simclr_embed.evaluation",
        "--model",
        "pixels",
        "--image-size",
        "8",
    ]
    ok = subprocess.run(
        [*base, "--train", str(good), "--val", str(good), "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "r.json").read_text())["knn"]["top1"] == 1.0
    usage = subprocess.run(
        [*base, "--train", str(good)], capture_output=True, text=True, timeout=120
    )
    assert usage.returncode == 2 and "--val" in usage.stderr


def test_baselines_are_scored_the_same_way_beside_the_model(
    tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--baselines untrained,pixels: each equals its own evaluation run separately — the step-0
    network of the same architecture (seed 0) written as a checkpoint, and --model pixels."""
    import torch

    from simclr_embed.training.checkpoint import load_checkpoint
    from simclr_embed.training.model import build_model
    from tests.conftest import write_checkpoint

    train = write_colour_folder(tmp_path / "train", per_class=6, seed=1)
    val = write_colour_folder(tmp_path / "val", per_class=4, seed=2)
    common = ["--train", str(train), "--val", str(val), "--k", "3", "--probe-epochs", "30",
              "--probe-l2", "1e-2", "--device", "cpu"]  # fmt: skip
    both = run_eval(["--model", str(tiny_onnx), *common, "--baselines", "untrained,pixels"], tmp_path)  # fmt: skip
    printed = capsys.readouterr().out
    assert "untrained" in printed and "pixels" in printed and "chance" in printed
    cfg = load_checkpoint(tiny_checkpoint)["config"]
    torch.manual_seed(0)
    step0 = write_checkpoint(tmp_path / "step0.pt", build_model(cfg), cfg, step=0)
    alone = run_eval(["--model", str(step0), *common], tmp_path)
    pixels = run_eval(["--model", "pixels", "--image-size", "32", *common], tmp_path)
    for name, ref in (("untrained", alone), ("pixels", pixels)):
        got = both["baselines"][name]
        assert got["knn"] == ref["knn"], name
        assert got["probe"]["top1"] == pytest.approx(ref["probe"]["top1"]), name
        assert got["feature_dim"] == ref["feature_dim"]
    with pytest.raises(SystemExit) as exit_:
        simclr(["evaluate", "--model", "pixels", *common, "--baselines", "untrained"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        simclr(["evaluate", "--model", str(tiny_onnx), *common, "--baselines", "random"])
    assert exit_.value.code == 2


def test_a_terminal_sees_progress_of_the_embedding_and_the_probe(tmp_path: Path) -> None:
    """In a real pseudo-terminal the slow stages draw bars (the probe ran minutes silent)."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    train = write_colour_folder(tmp_path / "train", per_class=6, seed=1)
    master, slave = pty.openpty()
    # A new pty is 0×0, and tqdm draws nothing in no columns: give it a terminal's 80×24.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "simclr_embed.cli", "evaluate", "--model", "pixels",
         "--train", str(train), "--val", str(train), "--probe-epochs", "20", "--device", "cpu"],
        stdout=slave, stderr=slave, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the pty closes when the process ends
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(60) == 0
    os.close(master)
    text = seen.decode(errors="replace")
    assert "model: embed train" in text and "model: linear probe" in text, text[-2000:]
