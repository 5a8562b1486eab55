"""The fp32 export: graph signature, parity with an independent PyTorch reference at several batch
sizes, batch independence, metadata, model_version, atomic failure, torch-free loading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from simclr_embed.errors import SimclrError
from simclr_embed.export import verify
from simclr_embed.export.onnx_export import export_checkpoint, weights_version
from simclr_embed.imageio import resize_policy_for
from tests.export.conftest import cosine_rows, ort_session, torch_reference, uint8_images

META_KEYS = {
    "simclr.arch",
    "simclr.image_size",
    "simclr.mean",
    "simclr.std",
    "simclr.resize",
    "simclr.feature_dim",
    "simclr.projection_dim",
    "simclr.train_step",
    "simclr.model_version",
}


def meta_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def assert_parity(path: Path, checkpoint: Path, size: int, batch_sizes=(1, 3, 8)) -> None:
    session = ort_session(path)
    for n in batch_sizes:
        images = uint8_images(n, size, seed=n)
        feats, proj = session.run(["features", "projection"], {"images": images})
        ref_f, ref_p = torch_reference(checkpoint, images)
        assert feats.shape == ref_f.shape and proj.shape == ref_p.shape
        assert feats.dtype == np.float32 and proj.dtype == np.float32
        for out, ref in ((feats, ref_f), (proj, ref_p)):
            assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
            assert cosine_rows(out, ref).min() >= 0.99999


def test_graph_signature_and_checker(exported_tiny):
    path, _ = exported_tiny
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert not list(path.parent.glob("*.data")), "weights must live inside the .onnx file"
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    (inp,) = model.graph.input
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    outs = {o.name: o.type.tensor_type for o in model.graph.output}
    assert set(outs) == {"features", "projection"}
    assert all(t.elem_type == onnx.TensorProto.FLOAT for t in outs.values())


def test_parity_with_independent_reference(exported_tiny, tiny_checkpoint):
    path, report = exported_tiny
    # The built-in check ran and passed at N=1 and N=7 ...
    assert report["parity"]["ok"] and set(report["parity"]["batches"]) == {1, 7}
    for per_output in report["parity"]["batches"].values():
        assert all(c["min_cosine"] >= 0.99999 for c in per_output.values())
    # ... and an independent reference agrees at other batch sizes.
    assert_parity(path, tiny_checkpoint, 32)


def test_batch_independence(exported_tiny):
    path, _ = exported_tiny
    session = ort_session(path)
    images = uint8_images(8, 32, seed=5)
    batch = session.run(None, {"images": images})
    for i in (0, 3, 7):
        alone = session.run(None, {"images": images[i : i + 1]})
        for b, a in zip(batch, alone, strict=True):
            np.testing.assert_allclose(a[0], b[i], rtol=0, atol=1e-5)


def test_metadata(exported_tiny, tiny_checkpoint):
    path, report = exported_tiny
    meta = meta_of(path)
    assert meta.keys() >= META_KEYS
    cfg = torch.load(tiny_checkpoint, weights_only=True)["config"]
    assert meta["simclr.arch"] == "resnet18"
    assert meta["simclr.image_size"] == "32"
    assert [float(v) for v in meta["simclr.mean"].split(",")] == cfg["mean"]
    assert [float(v) for v in meta["simclr.std"].split(",")] == cfg["std"]
    assert meta["simclr.resize"] == resize_policy_for(32) == "resize"
    assert (meta["simclr.feature_dim"], meta["simclr.projection_dim"]) == ("512", "32")
    assert meta["simclr.train_step"] == "3"
    assert meta["simclr.precision"] == "fp32"
    assert len(meta["simclr.model_version"]) == 16
    int(meta["simclr.model_version"], 16)
    assert report["metadata"] == {k: v for k, v in meta.items() if k.startswith("simclr.")}


def test_model_version_follows_the_weights(exported_tiny, tiny_checkpoint, tmp_path):
    path, _ = exported_tiny
    version = meta_of(path)["simclr.model_version"]
    # Same weights, another step and file → a fresh export gets the same version.
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["step"] = 99
    torch.save(ckpt, tmp_path / "same.pt")
    export_checkpoint(tmp_path / "same.pt", tmp_path / "same.onnx", verify=False)
    same = meta_of(tmp_path / "same.onnx")
    assert same["simclr.model_version"] == version and same["simclr.train_step"] == "99"
    # One weight nudged → another version; metadata alone does not change it.
    model = onnx.load(str(path))
    assert weights_version(model) == version
    del model.metadata_props[:]
    assert weights_version(model) == version
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 1e-3
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    assert weights_version(model) != version


def test_failed_verification_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    # A tolerance no export can meet: the check must fail and the output must not appear.
    monkeypatch.setattr(verify, "FP32", verify.Tolerance(min_cosine=1.5, rel_max_abs=0.0))
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(SimclrError, match="parity check failed"):
        export_checkpoint(tiny_checkpoint, out, exporter="torchscript")  # the quicker exporter
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temp file left behind


def test_opset17_goes_through_torchscript_and_passes_the_same_checks(tiny_checkpoint, tmp_path):
    # torch 2.14's dynamo exporter cannot write opset 17; "auto" picks the TorchScript exporter.
    out = tmp_path / "ts.onnx"
    report = export_checkpoint(tiny_checkpoint, out, opset=17)
    assert report["exporter"] == "torchscript" and report["parity"]["ok"]
    opsets = [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")]
    assert opsets == [17]
    assert_parity(out, tiny_checkpoint, 32, batch_sizes=(2,))


def test_loads_without_torch(exported_tiny, tiny_checkpoint, tmp_path):
    """What the server and other teams do: onnxruntime + numpy only, in a fresh process."""
    path, _ = exported_tiny
    images = uint8_images(3, 32, seed=9)
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import onnxruntime as ort
        s = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        meta = s.get_modelmeta().custom_metadata_map
        feats, proj = s.run(["features", "projection"], {{"images": np.load({str(tmp_path / "images.npy")!r})}})
        np.save({str(tmp_path / "feats.npy")!r}, feats)
        assert "torch" not in sys.modules, "loading the model pulled in torch"
        print(json.dumps({{"meta": dict(meta), "shape": list(proj.shape)}}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["meta"].keys() >= META_KEYS and result["shape"] == [3, 32]
    ref_f, _ = torch_reference(tiny_checkpoint, images)
    assert cosine_rows(np.load(tmp_path / "feats.npy"), ref_f).min() >= 0.99999


@pytest.mark.slow
def test_resnet50(r50_checkpoint, tmp_path):
    out = tmp_path / "r50.onnx"
    report = export_checkpoint(r50_checkpoint, out)
    assert report["parity"]["ok"]
    meta = meta_of(out)
    assert meta["simclr.arch"] == "resnet50" and meta["simclr.feature_dim"] == "2048"
    assert meta["simclr.projection_dim"] == "128" and meta["simclr.image_size"] == "64"
    assert meta["simclr.mean"] == "0.5,0.45,0.4"
    assert_parity(out, r50_checkpoint, 64, batch_sizes=(3,))  # 1 and 7 checked by export
