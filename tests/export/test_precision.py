"""fp16 and int8 variants: boundary types kept, within their tolerances of the fp32 reference."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest

from simclr_embed.errors import SimclrError
from simclr_embed.export.onnx_export import export_checkpoint
from simclr_embed.export.quantize import INT8_MEAN_FEATURE_COSINE, INT8_MIN_COSINE, quantize_model
from tests.export.conftest import cosine_rows, ort_session, torch_reference, uint8_images


def simclr_meta(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("simclr.")}


def assert_boundary_types(model: onnx.ModelProto) -> None:
    """uint8 in, float32 out, whatever the precision inside."""
    (inp,) = model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert {o.name: o.type.tensor_type.elem_type for o in model.graph.output} == {
        "features": onnx.TensorProto.FLOAT,
        "projection": onnx.TensorProto.FLOAT,
    }


def test_fp16(tiny_checkpoint, exported_tiny, tmp_path):
    out = tmp_path / "fp16.onnx"
    report = export_checkpoint(tiny_checkpoint, out, fp16=True)
    model = onnx.load(str(out))
    assert_boundary_types(model)
    # The weights really are float16: most initializer bytes are FLOAT16.
    kinds = Counter()
    for t in model.graph.initializer:
        kinds[t.data_type] += len(t.raw_data)
    assert kinds[onnx.TensorProto.FLOAT16] > 10 * kinds[onnx.TensorProto.FLOAT]
    assert out.stat().st_size < 0.6 * exported_tiny[0].stat().st_size
    meta = simclr_meta(model)
    assert meta["simclr.precision"] == "fp16"
    assert (
        meta["simclr.model_version"]
        != simclr_meta(onnx.load(str(exported_tiny[0])))["simclr.model_version"]
    )
    parity = report["parity"]
    if "skipped" in parity:  # a CPU provider without float16 kernels: the message says so
        pytest.skip(parity["skipped"])
    assert parity["ok"]
    images = uint8_images(4, 32, seed=11)
    feats, proj = ort_session(out).run(["features", "projection"], {"images": images})
    ref_f, ref_p = torch_reference(tiny_checkpoint, images)
    assert cosine_rows(feats, ref_f).min() >= 0.999 and cosine_rows(proj, ref_p).min() >= 0.999


def test_int8_static_with_calibration_folder(exported_tiny, image_folder, tmp_path):
    fp32_path, _ = exported_tiny
    out = tmp_path / "int8.onnx"
    report = quantize_model(fp32_path, out, calibration_data=image_folder, measure_speed=False)
    assert report["mode"] == "static" and report["ok"]
    # 24 images: a quarter held out, never calibrated on.
    assert report["held_images"] == 6 and report["calibration_images"] == 18
    assert min(report["min_cosine"].values()) >= INT8_MIN_COSINE
    assert report["mean_cosine"]["features"] >= INT8_MEAN_FEATURE_COSINE
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert_boundary_types(model)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    meta, fp32_meta = simclr_meta(model), simclr_meta(onnx.load(str(fp32_path)))
    assert meta["simclr.precision"] == "int8"
    assert meta["simclr.quantization"] == "static-qdq-per-channel"
    assert meta["simclr.model_version"] != fp32_meta["simclr.model_version"]
    for key in (
        "simclr.arch",
        "simclr.image_size",
        "simclr.mean",
        "simclr.std",
        "simclr.resize",
        "simclr.feature_dim",
        "simclr.projection_dim",
        "simclr.train_step",
    ):
        assert meta[key] == fp32_meta[key]
    # Independent fidelity check: int8 vs fp32 on images it never saw, through plain ORT.
    images = uint8_images(4, 32, seed=3)
    q = ort_session(out).run(["features"], {"images": images})[0]
    f = ort_session(fp32_path).run(["features"], {"images": images})[0]
    assert cosine_rows(q, f).mean() >= 0.95


def test_int8_bad_calibration_folder(exported_tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    (empty / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "int8.onnx"
    with pytest.raises(SimclrError, match="no readable images"):
        quantize_model(exported_tiny[0], out, calibration_data=empty)
    with pytest.raises(SimclrError, match="calibration folder not found"):
        quantize_model(exported_tiny[0], out, calibration_data=tmp_path / "missing")
    assert not out.exists()


def test_int8_failed_fidelity_leaves_nothing(exported_tiny, tmp_path, monkeypatch):
    import simclr_embed.export.quantize as quantize

    monkeypatch.setattr(quantize, "INT8_MIN_COSINE", 1.5)  # unreachable
    out = tmp_path / "sub" / "int8.onnx"
    with pytest.raises(SimclrError, match="too far from fp32"):
        quantize_model(exported_tiny[0], out, measure_speed=False)
    assert not out.exists() and list(Path(out.parent).iterdir()) == []
