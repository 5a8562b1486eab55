"""One import name, layered rooms: the wheel installs only ``simclr_embed``; the import contracts
in pyproject.toml hold; our commands and the README's client snippet work from a folder holding
the user's own ``server.py``, ``training/``, ``export.py``, ``evaluation.py`` and ``neighbors.py``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.server.conftest import ServerThread, serve_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHADOWS = ("server.py", "training/__init__.py", "export.py", "evaluation.py", "neighbors.py")


def test_import_contracts_hold() -> None:
    """`lint-imports` with the contracts in pyproject.toml: layers, torch-free serving, no cycles."""
    run = subprocess.run(
        [str(BIN / "lint-imports")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert re.search(r"Contracts: (\d+) kept, 0 broken", run.stdout), run.stdout[-500:]


def test_no_module_grows_past_400_lines_without_saying_why() -> None:
    for path in (ROOT / "simclr_embed").rglob("*.py"):
        if "pb" in path.relative_to(ROOT).parts:
            continue  # generated
        lines = path.read_text().splitlines()
        if len(lines) > 400:
            opening = "\n".join(lines[:30]).lower()
            assert "long because" in opening, f"{path} has {len(lines)} lines and no reason"


def test_the_wheel_installs_exactly_one_top_level_name(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = tmp_path.glob("simclr_embed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"simclr_embed"}, tops
    # The generated stubs travel with it (the serve image has no protoc).
    assert "simclr_embed/pb/simclr/v1/embedding_pb2.py" in names


def _shadowing_folder(root: Path) -> Path:
    """A user's project whose own modules carry our old top-level names."""
    for rel in SHADOWS:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("raise RuntimeError('the user module was imported instead of ours')\n")
    return root


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_commands_work_beside_the_users_own_modules(tmp_path: Path) -> None:
    folder = _shadowing_folder(tmp_path)
    simclr = shutil.which("simclr", path=str(BIN))
    assert simclr is not None
    run = _run([simclr, "--help"], folder)
    assert run.returncode == 0 and "embed" in run.stdout, run.stderr
    run = _run([sys.executable, "-m", "simclr_embed.training", "--help"], folder)
    assert run.returncode == 0 and "--data" in run.stdout, run.stderr


def test_readme_client_snippet_runs_beside_the_users_own_server_py(
    tmp_path: Path, tiny_onnx: Path
) -> None:
    """The README's Python block, as written, against a real server (its address and image
    names swapped for this test's), run from a folder whose ``server.py`` would shadow us."""
    from PIL import Image

    readme = (ROOT / "README.md").read_text()
    (snippet,) = [
        b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "EmbeddingClient" in b
    ]
    folder = _shadowing_folder(tmp_path)
    for name, color in (("cat.jpg", (200, 40, 40)), ("dog.png", (40, 40, 200))):
        Image.new("RGB", (40, 30), color).save(folder / name)
    srv = ServerThread(serve_config(tiny_onnx))
    try:
        code = snippet.replace("127.0.0.1:50051", srv.target)
        code += "\nassert vectors.shape[0] == 2, vectors.shape\nprint('ROWS', vectors.shape)\n"
        run = _run([sys.executable, "-c", code], folder)
    finally:
        srv.close()
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ROWS (2," in run.stdout


@pytest.mark.parametrize("module", ["simclr_embed.server", "simclr_embed.export"])
def test_module_forms_answer_help(tmp_path: Path, module: str) -> None:
    run = _run([sys.executable, "-m", module, "--help"], _shadowing_folder(tmp_path))
    assert run.returncode == 0 and "usage:" in run.stdout, run.stderr[-1000:]


def test_cpu_extras_are_the_default_ones_on_the_cpu_onnxruntime() -> None:
    """serve-cpu/export-cpu carry exactly what serve/export carry, with ONNX Runtime's CPU build
    instead of onnxruntime-gpu (no drift between the two routes); serve-cpu has no torch."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    def names(reqs: list[str], drop_gpu: bool) -> set[str]:
        out = set()
        for req in reqs:
            name = re.split(r"[<>=!;\[ ]", req, maxsplit=1)[0].strip().lower()
            if drop_gpu and name in ("onnxruntime-gpu", "onnxruntime"):
                continue
            out.add(name)
        return out

    for base in ("serve", "export"):
        cpu = extras[f"{base}-cpu"]
        assert not any("onnxruntime-gpu" in r or "nvidia" in r for r in cpu), cpu
        assert "onnxruntime>=1.20" in cpu
        assert names(cpu, True) == names(extras[base], True), base
    assert "torch" not in names(extras["serve-cpu"], False)
    (all_cpu,) = extras["all-cpu"]
    assert "serve-cpu" in all_cpu and "export-cpu" in all_cpu and "serve," not in all_cpu
