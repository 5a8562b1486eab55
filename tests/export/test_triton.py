"""The Triton repository: layout, and config.pbtxt parsed as protobuf text with Triton's schema.

No Triton install: the part of Triton's ``model_config.proto`` we use (same package, message,
field and enum names and numbers as triton-inference-server/common) is compiled at test time with
grpc_tools.protoc; ``text_format.Parse`` rejects any field or enum name that schema lacks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import onnx
import pytest
from google.protobuf import text_format

from simclr_embed.export.triton import write_triton_repo

MODEL_CONFIG_SUBSET = """
syntax = "proto3";
package inference;

enum DataType {
  TYPE_INVALID = 0; TYPE_BOOL = 1; TYPE_UINT8 = 2; TYPE_UINT16 = 3; TYPE_UINT32 = 4;
  TYPE_UINT64 = 5; TYPE_INT8 = 6; TYPE_INT16 = 7; TYPE_INT32 = 8; TYPE_INT64 = 9;
  TYPE_FP16 = 10; TYPE_FP32 = 11; TYPE_FP64 = 12; TYPE_STRING = 13; TYPE_BF16 = 14;
}
message ModelInstanceGroup {
  enum Kind { KIND_AUTO = 0; KIND_GPU = 1; KIND_CPU = 2; KIND_MODEL = 3; }
  string name = 1;
  Kind kind = 4;
  int32 count = 2;
  repeated int32 gpus = 3;
}
message ModelInput {
  enum Format { FORMAT_NONE = 0; FORMAT_NHWC = 1; FORMAT_NCHW = 2; }
  string name = 1;
  DataType data_type = 2;
  Format format = 3;
  repeated int64 dims = 4;
}
message ModelOutput {
  string name = 1;
  DataType data_type = 2;
  repeated int64 dims = 3;
}
message ModelDynamicBatching {
  repeated int32 preferred_batch_size = 1;
  uint64 max_queue_delay_microseconds = 2;
  bool preserve_ordering = 3;
}
message ModelConfig {
  string name = 1;
  string platform = 2;
  string backend = 17;
  int32 max_batch_size = 4;
  repeated ModelInput input = 5;
  repeated ModelOutput output = 6;
  oneof scheduling_choice { ModelDynamicBatching dynamic_batching = 11; }
  repeated ModelInstanceGroup instance_group = 7;
  string default_model_filename = 8;
}
"""

# What a Triton user would write by hand for the tiny model (resnet18, 32 px, 32-d head).
EXPECTED = """
name: "tiny-enc"
platform: "onnxruntime_onnx"
max_batch_size: 16
input { name: "images" data_type: TYPE_UINT8 dims: [32, 32, 3] }
output { name: "features" data_type: TYPE_FP32 dims: [512] }
output { name: "projection" data_type: TYPE_FP32 dims: [32] }
dynamic_batching { max_queue_delay_microseconds: 500 }
instance_group { count: 2 kind: KIND_CPU }
"""


@pytest.fixture(scope="session")
def model_config_pb2(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    from grpc_tools import protoc

    folder = tmp_path_factory.mktemp("triton_proto")
    (folder / "model_config.proto").write_text(MODEL_CONFIG_SUBSET)
    rc = protoc.main(["protoc", f"-I{folder}", f"--python_out={folder}", "model_config.proto"])
    assert rc == 0
    spec = importlib.util.spec_from_file_location(
        "model_config_pb2", folder / "model_config_pb2.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_repository(exported_tiny, model_config_pb2, tmp_path: Path):
    path, _ = exported_tiny
    result = write_triton_repo(
        path,
        tmp_path / "repo",
        name="tiny-enc",
        max_batch_size=16,
        max_queue_delay_us=500,
        instances=2,
        kind="cpu",
    )
    model_file = tmp_path / "repo" / "tiny-enc" / "1" / "model.onnx"
    config_file = tmp_path / "repo" / "tiny-enc" / "config.pbtxt"
    assert Path(result["model"]) == model_file and Path(result["config"]) == config_file
    assert model_file.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in (tmp_path / "repo" / "tiny-enc").iterdir()) == [
        "1",
        "config.pbtxt",
    ]

    parsed = text_format.Parse(config_file.read_text(), model_config_pb2.ModelConfig())
    expected = text_format.Parse(EXPECTED, model_config_pb2.ModelConfig())
    assert parsed == expected, text_format.MessageToString(parsed)
    # The header comment carries the version, so a repo can be matched to its ONNX file.
    version = {p.key: p.value for p in onnx.load(str(path)).metadata_props}["simclr.model_version"]
    assert version in config_file.read_text().splitlines()[0]


def test_triton_rejects_unknown_names(model_config_pb2):
    # The schema is strict: a misspelt field (what a wrong config would contain) fails to parse.
    with pytest.raises(text_format.ParseError):
        text_format.Parse("max_batch: 4", model_config_pb2.ModelConfig())
    with pytest.raises(text_format.ParseError):
        text_format.Parse('input { name: "x" data_type: UINT8 }', model_config_pb2.ModelConfig())
