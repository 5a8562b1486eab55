"""``--torch-program``: the same model as a ``torch.export`` program, and the torch runtime that
serves it (same batcher and servicer) — compared with ONNX Runtime and an independent reference."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from simclr_embed.client import EmbeddingClient
from simclr_embed.errors import SimclrError, run_main
from simclr_embed.export.cli import main
from simclr_embed.inference.runtime import OnnxRuntime, open_runtime
from simclr_embed.inference.torch_runtime import TorchRuntime, load_program
from tests.export.conftest import torch_reference
from tests.server.conftest import ServerThread, serve_config

REPO = Path(__file__).resolve().parents[2]
S = 32


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``simclr export-onnx --torch-program`` run once: (model.onnx, model.pt2), both verified."""
    out = tmp_path_factory.mktemp("pt2")
    onnx_path, pt2 = out / "model.onnx", out / "model.pt2"
    argv = ["--checkpoint", str(tiny_checkpoint), "--output", str(onnx_path)]
    assert run_main(main, [*argv, "--torch-program", str(pt2)]) == 0
    return onnx_path, pt2


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """The CPU torch runtime sets torch's (process-wide) thread count, as a server should."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, S, S, 3), dtype=np.uint8)


def test_program_carries_the_onnx_metadata(exported: tuple[Path, Path]) -> None:
    onnx_path, pt2 = exported
    onnx_meta = ort.InferenceSession(str(onnx_path)).get_modelmeta().custom_metadata_map
    _, meta = load_program(pt2)
    assert {k: v for k, v in meta.items() if k not in ("simclr.format",)} == onnx_meta
    assert meta["simclr.format"] == "torch.export" and meta["simclr.precision"] == "fp32"


def test_torch_runtime_matches_onnx_runtime_and_the_reference(
    exported: tuple[Path, Path], tiny_checkpoint: Path
) -> None:
    onnx_path, pt2 = exported
    torch_rt = TorchRuntime(pt2, device="cpu", max_batch_size=8)
    onnx_rt = OnnxRuntime(onnx_path, device="cpu", max_batch_size=8)
    assert torch_rt.info == onnx_rt.info.__class__(**{**vars(onnx_rt.info), "path": str(pt2)})
    assert torch_rt.providers == ["torch-cpu-fp32"] and not torch_rt.on_gpu
    for n in (1, 5, 8):  # the batch axis is dynamic
        x = _images(n, seed=n)
        got, want = torch_rt.encode(x), onnx_rt.encode(x)
        h_ref, z_ref = torch_reference(tiny_checkpoint, x)
        for name, ref in (("features", h_ref), ("projection", z_ref)):
            assert got[name].shape == want[name].shape and got[name].dtype == np.float32
            scale = np.abs(want[name]).max()
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4 * scale)
            np.testing.assert_allclose(got[name], ref, rtol=0, atol=1e-4 * scale)
    # Each image alone gives its row of the batch.
    x = _images(4, seed=9)
    alone = np.concatenate([torch_rt.encode(x[i : i + 1])["features"] for i in range(4)])
    np.testing.assert_allclose(alone, torch_rt.encode(x)["features"], rtol=1e-5, atol=1e-5)


def test_bf16_autocast_is_really_applied_and_close(exported: tuple[Path, Path]) -> None:
    """The CPU twin of the GPU path's bf16: outputs move (autocast ran), stay close."""
    _, pt2 = exported
    fp32 = TorchRuntime(pt2, device="cpu").encode(_images(4, 3))["features"]
    bf16_rt = TorchRuntime(pt2, device="cpu", precision="bf16")
    bf16 = bf16_rt.encode(_images(4, 3))["features"]
    assert bf16_rt.providers == ["torch-cpu-bf16"] and bf16.dtype == np.float32
    assert np.abs(bf16 - fp32).max() > 1e-4  # not the fp32 path in disguise
    cos = (bf16 * fp32).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cos.min() > 0.99


def test_server_serves_the_program_like_the_onnx_model(exported: tuple[Path, Path]) -> None:
    onnx_path, pt2 = exported
    pics = list(_images(6, seed=21))
    results = {}
    for path in (onnx_path, pt2):
        srv = ServerThread(serve_config(path, max_batch_size=4))
        try:
            with EmbeddingClient(srv.target, max_batch=3) as client:
                info = client.model_info()
                results[path.suffix] = (info, client.embed(pics, kind="projection", concurrency=2))
        finally:
            srv.close()
    (onnx_info, onnx_vecs), (pt2_info, pt2_vecs) = results[".onnx"], results[".pt2"]
    assert pt2_info["providers"] == ["torch-cpu-fp32"]
    assert pt2_info["model_version"] == onnx_info["model_version"]
    np.testing.assert_allclose(pt2_vecs, onnx_vecs, rtol=0, atol=1e-4 * np.abs(onnx_vecs).max())


def test_bad_programs_and_flags(exported: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    onnx_path, _ = exported
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(SimclrError, match="cannot load torch program"):
        open_runtime(junk, device="cpu")
    with pytest.raises(SimclrError, match="model file not found"):
        open_runtime(tmp_path / "missing.pt2", device="cpu")
    for flags, named in ((["--fp16"], "--torch-program"), ([], ".pt2 path")):
        out = tmp_path / ("m.pt2" if flags else "m.pt")
        with pytest.raises(SystemExit) as exit_:
            main(["--checkpoint", "x.pt", "--output", str(onnx_path), "--torch-program", str(out), *flags])  # fmt: skip
        assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_without_torch_the_server_names_the_extra(tmp_path: Path) -> None:
    (tmp_path / "m.pt2").write_bytes(b"PK\x03\x04")  # a program file is there; torch is not
    code = (
        "import sys; sys.modules['torch'] = None\n"  # as if torch were not installed
        "from simclr_embed.inference.runtime import open_runtime\n"
        "from simclr_embed.errors import SimclrError\n"
        "try:\n"
        f"    open_runtime({str(tmp_path / 'm.pt2')!r})\n"
        "except SimclrError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert "needs torch" in out.stdout and "simclr-embed[export]" in out.stdout, out
