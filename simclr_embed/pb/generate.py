"""Regenerate the committed gRPC stubs from ``proto/`` (``make proto``).

The stubs are committed (so a server image needs no grpcio-tools) and ``tests/server/test_proto.py``
regenerates them into a temporary folder and compares, so they cannot drift from the .proto.

protoc writes ``from simclr.v1 import embedding_pb2``, which only resolves with ``simclr_embed/pb`` on
``sys.path``; the import is rewritten to the package path ``simclr_embed.pb.simclr.v1``.

    python -m simclr_embed.pb.generate            # writes simclr_embed/pb/simclr/v1/
    python -m simclr_embed.pb.generate --out DIR  # writes DIR/simclr/v1/ (used by the test)
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILES = ("simclr/v1/embedding.proto", "inference/grpc_predict_v2.proto")
DEFAULT_OUT = Path(__file__).resolve().parent
PACKAGE = "simclr_embed.pb"

_IMPORT_RE = re.compile(r"^from (simclr\.v1|inference) import ", re.MULTILINE)
_INIT_TEXT = "# Generated package marker (simclr_embed/pb/generate.py).\n"


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (grpcio-tools) into ``out_dir``; return the generated files, sorted."""
    from grpc_tools import protoc  # dev-only dependency: imported here, not at module load

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    generated: list[Path] = []
    for proto in PROTO_FILES:
        pkg_dir = out_dir / Path(proto).parent
        for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"):
            path = pkg_dir / (Path(proto).stem + suffix)
            text = _IMPORT_RE.sub(rf"from {PACKAGE}.\1 import ", path.read_text())
            path.write_text(text)
            generated.append(path)
        # Package markers so that `simclr_embed.pb.simclr.v1` imports as a regular package.
        for parent in {pkg_dir, *[p for p in pkg_dir.parents if out_dir in p.parents]}:
            (parent / "__init__.py").write_text(_INIT_TEXT)
            generated.append(parent / "__init__.py")
    return sorted(generated)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output root [simclr_embed/pb]"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
