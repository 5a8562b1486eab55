"""The committed stubs are what protoc makes of proto/ today, and the proto is CONTRACT §4."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from simclr_embed.pb import generate
from simclr_embed.pb.simclr.v1 import embedding_pb2, embedding_pb2_grpc

COMMITTED = Path(generate.__file__).resolve().parent


def _serialized_descriptor(pb2_source: str) -> bytes:
    match = re.search(r"AddSerializedFile\((b'.*?')\)\n", pb2_source, re.DOTALL)
    assert match, "no serialized descriptor in generated module"
    return ast.literal_eval(match.group(1))


def test_stubs_are_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    fresh = generate.generate(tmp_path)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in fresh)
    assert names == [
        "inference/__init__.py",
        "inference/grpc_predict_v2_pb2.py",
        "inference/grpc_predict_v2_pb2.pyi",
        "inference/grpc_predict_v2_pb2_grpc.py",
        "simclr/__init__.py",
        "simclr/v1/__init__.py",
        "simclr/v1/embedding_pb2.py",
        "simclr/v1/embedding_pb2.pyi",
        "simclr/v1/embedding_pb2_grpc.py",
    ]
    # The schema itself, whatever grpcio-tools version made the text: run `make proto` if this fails.
    fresh_pb2 = (tmp_path / "simclr/v1/embedding_pb2.py").read_text()
    assert _serialized_descriptor(fresh_pb2) == embedding_pb2.DESCRIPTOR.serialized_pb
    # Byte for byte when the installed generator is the one that made the committed files.
    committed_grpc = (COMMITTED / "simclr/v1/embedding_pb2_grpc.py").read_text()
    fresh_grpc = (tmp_path / "simclr/v1/embedding_pb2_grpc.py").read_text()
    version = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", committed_grpc)
    assert version
    if version.group(1) not in fresh_grpc:
        pytest.skip(
            f"committed stubs were made by grpcio-tools {version.group(1)}; text not compared"
        )
    for name in names:
        assert (tmp_path / name).read_text() == (COMMITTED / name).read_text(), name
    assert "from simclr_embed.pb.simclr.v1 import embedding_pb2" in fresh_grpc


def test_field_numbers_are_the_contract() -> None:
    def numbers(message: str) -> dict[str, int]:
        fields = embedding_pb2.DESCRIPTOR.message_types_by_name[message].fields
        return {f.name: f.number for f in fields}

    assert embedding_pb2.DESCRIPTOR.package == "simclr.v1"
    assert numbers("Image") == {"encoded": 1, "raw": 2}
    assert numbers("RawImage") == {"pixels": 1, "height": 2, "width": 3, "channels": 4}
    # CONTRACT §4's fixed numbers, plus the fields added since (new numbers only).
    assert numbers("EmbedRequest") == {
        "images": 1,
        "kind": 2,
        "l2_normalize": 3,
        "per_image_errors": 4,
        "packed": 5,
    }
    assert numbers("Embedding") == {"values": 1}
    assert numbers("ImageError") == {"index": 1, "reason": 2}
    assert numbers("EmbedResponse") == {
        "embeddings": 1,
        "kind": 2,
        "dimension": 3,
        "model_version": 4,
        "errors": 5,
        "packed_embeddings": 6,
        "timings": 7,
    }
    assert numbers("StageTimings") == {"decode_ms": 1, "queue_ms": 2, "inference_ms": 3}
    assert numbers("GetModelInfoRequest") == {}
    assert numbers("GetModelInfoResponse") == {
        "model_version": 1,
        "arch": 2,
        "image_size": 3,
        "feature_dimension": 4,
        "projection_dimension": 5,
        "max_batch_size": 6,
        "providers": 7,
    }
    kinds = embedding_pb2.EmbeddingKind
    assert (
        kinds.EMBEDDING_KIND_UNSPECIFIED,
        kinds.EMBEDDING_KIND_FEATURES,
        kinds.EMBEDDING_KIND_PROJECTION,
    ) == (0, 1, 2)
    service = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"]
    assert sorted(m.name for m in service.methods) == ["Embed", "EmbedStream", "GetModelInfo"]
    stream = service.methods_by_name["EmbedStream"]
    assert stream.client_streaming and stream.server_streaming
    assert hasattr(embedding_pb2_grpc, "add_EmbeddingServiceServicer_to_server")
