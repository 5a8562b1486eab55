"""A second model for the embed tests: other weights and its own version."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

OTHER_VERSION = "b0b0b0b0b0b0b0b0"


@pytest.fixture(scope="session")
def other_onnx(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model: other weights (one conv scaled) and its own version."""
    proto = onnx.load(str(tiny_onnx))
    for init in proto.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 4:  # the first convolution
            init.CopyFrom(numpy_helper.from_array(w * 1.5, init.name))
            break
    for p in proto.metadata_props:
        if p.key == "simclr.model_version":
            p.value = OTHER_VERSION
    path = tmp_path_factory.mktemp("other") / "other.onnx"
    onnx.save(proto, str(path))
    return path
