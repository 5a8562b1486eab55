"""The ``simclr`` console command: a thin dispatcher to each stage's own ``main(argv)``.

Subcommand modules are imported lazily so that ``simclr serve`` works in an image without torch.
Exit codes: 0 success, 1 runtime failure (one line on stderr), 2 bad usage (argparse).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from simclr_embed import __version__
from simclr_embed.errors import run_main

# subcommand -> (module with `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("simclr_embed.training.cli", "train SimCLR on a folder of images (torchrun-ready)"),
    "export-onnx": (
        "simclr_embed.export.cli",
        "export a checkpoint to a self-contained ONNX model",
    ),
    "serve": (
        "simclr_embed.server.cli",
        "serve an ONNX model over gRPC and HTTP with dynamic batching",
    ),
    "embed": (
        "simclr_embed.embed.cli",
        "embed image files/folders: offline, through servers, or on Ray",
    ),
    "health": ("simclr_embed.client.health", "is a server SERVING? exit 0 if so, else 1 and why"),
    "evaluate": (
        "simclr_embed.evaluation.cli",
        "kNN + linear probe of frozen features on labeled folders",
    ),
    "neighbors": (
        "simclr_embed.neighbors.cli",
        "nearest neighbours and near-duplicates of embedded images",
    ),
    "curate": (
        "simclr_embed.curate.cli",
        "duplicates, outliers, clusters, a subset to label, a gallery of embedded images",
    ),
}


# A missing third-party package → the extra that brings it (the serve image has no torch).
EXTRA_OF = {
    "torch": "train", "torchvision": "train", "tensorboard": "train", "yaml": "train",
    "onnx": "export", "onnxscript": "export", "onnxruntime": "serve", "grpc": "serve",
    "grpc_health": "serve", "grpc_reflection": "serve", "google": "serve",
    "prometheus_client": "serve", "tqdm": "serve", "pyarrow": "parquet", "faiss": "neighbors",
    "ray": "ray", "aiohttp": "serve",
}  # fmt: skip


def _missing(name: str, exc: ImportError) -> str:
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_OF.get(top, "all")
    return (
        f"error: 'simclr {name}' needs {top or 'a missing package'}, which is not installed: "
        f"install the {extra} extra: pip install 'simclr-embed[{extra}]'"
    )


def _usage() -> str:
    lines = ["usage: simclr <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'simclr <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"simclr-embed {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"simclr: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:  # an extra may be missing (e.g. `train` in the serve image): at import or once running
        module = importlib.import_module(module_name)
        return run_main(module.main, rest)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "simclr_embed":
            raise  # our own bug, not an install problem
        print(_missing(name, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
