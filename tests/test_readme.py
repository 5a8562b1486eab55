"""Every command in README.md is real: it parses with the actual CLI, and every file it names exists.

Commands are taken from the README's ```bash blocks (continuation lines joined, comments dropped)
and checked by kind: ``simclr SUB ...`` and ``python -m MOD ...`` with that stage's own argparse
(and its validation), ``torchrun ... -m simclr_embed.training ...`` with torch's own torchrun parser and then the
training parser, ``make X`` against the Makefile, ``docker`` against the Dockerfile's stages,
``grpcurl`` against the proto. ``make demo`` itself is run by tests/test_demo.py (scaled down).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.DOTALL)


def _commands() -> list[list[str]]:
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(shlex.split(line, comments=True))
    return out


COMMANDS = _commands()


def _parse_train(argv: list[str]) -> None:
    from simclr_embed.training.config import parse_config

    parse_config(argv)


def _parse_export(argv: list[str]) -> None:
    from simclr_embed.export.cli import parse_config

    parse_config(argv)


def _parse_serve(argv: list[str]) -> None:
    from simclr_embed.server.config import build_parser, config_from_args

    parser = build_parser()
    config_from_args(parser.parse_args(argv), parser)


def _parse_embed(argv: list[str]) -> None:
    from simclr_embed.embed.cli import build_parser

    build_parser().parse_args(argv)


def _parse_evaluate(argv: list[str]) -> None:
    from simclr_embed.evaluation.cli import parse_config

    parse_config(argv)


def _parse_neighbors(argv: list[str]) -> None:
    from simclr_embed.neighbors.cli import parse_config

    parse_config(argv)


def _parse_curate(argv: list[str]) -> None:
    from simclr_embed.curate.cli import parse_config

    parse_config(argv)


def _parse_health(argv: list[str]) -> None:
    from simclr_embed.client.health import build_parser

    build_parser().parse_args(argv)


def _parse_demo(argv: list[str]) -> None:
    from simclr_embed.demo.pipeline import get_args_parser

    get_args_parser().parse_args(argv)


def _parse_sample_data(argv: list[str]) -> None:
    from simclr_embed.demo.sample_data import get_args_parser

    get_args_parser().parse_args(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": _parse_train,
    "export-onnx": _parse_export,
    "serve": _parse_serve,
    "embed": _parse_embed,
    "evaluate": _parse_evaluate,
    "neighbors": _parse_neighbors,
    "curate": _parse_curate,
    "health": _parse_health,
}
MODULES: dict[str, Callable[[list[str]], None]] = {
    "simclr_embed.training": _parse_train,
    "simclr_embed.export": _parse_export,
    "simclr_embed.server": _parse_serve,
    "simclr_embed.evaluation": _parse_evaluate,
    "simclr_embed.neighbors": _parse_neighbors,
    "simclr_embed.curate": _parse_curate,
    "simclr_embed.demo": _parse_demo,
    "simclr_embed.demo.sample_data": _parse_sample_data,
}


def _check(argv: list[str]) -> None:
    """Parse one command line the way its real program would; SystemExit(2) fails the test."""
    prog, args = argv[0], argv[1:]
    if "--help" in args:  # only the program has to exist
        args = [a for a in args if a != "--help"]
        assert prog != "python" or (args[0] == "-m" and args[1] in MODULES), argv
        assert prog != "simclr" or not args or args[0] in SUBCOMMANDS, argv
        return
    if prog == "simclr":
        from simclr_embed.cli import COMMANDS as CLI

        assert args[0] in CLI and args[0] in SUBCOMMANDS, f"unknown subcommand in {argv}"
        SUBCOMMANDS[args[0]](args[1:])
    elif prog == "python":
        assert args[0] == "-m" and args[1] in MODULES, argv
        MODULES[args[1]](args[2:])
    elif prog == "torchrun":
        from torch.distributed.run import get_args_parser

        run = get_args_parser().parse_args(args)
        assert run.module and run.training_script == "simclr_embed.training", argv
        _parse_train(run.training_script_args)
    elif prog == "make":
        makefile = (ROOT / "Makefile").read_text()
        targets = [a for a in args if "=" not in a]
        for t in targets:
            assert re.search(rf"^{re.escape(t)}:", makefile, re.MULTILINE), f"no make target {t}"
        for a in args:
            if a.startswith("DEMO_ARGS="):
                _parse_demo(shlex.split(a.split("=", 1)[1]))
    elif prog == "docker":
        stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
        if args[0] == "build":
            assert args[args.index("--target") + 1] in stages, argv
        elif args[0] == "run":
            image = next(i for i, a in enumerate(args) if a.startswith("simclr-embed:"))
            rest = args[image + 1 :]
            if args[image].endswith(":serve"):
                _parse_serve(rest)  # the image's ENTRYPOINT is `simclr serve`
            else:
                _check(rest)
    elif prog == "grpcurl":
        protos = {
            "simclr.v1.EmbeddingService": "proto/simclr/v1/embedding.proto",
            "inference.GRPCInferenceService": "proto/inference/grpc_predict_v2.proto",
        }
        method = args[-1]
        service, _, rpc = method.rpartition("/")
        assert service in protos, method
        assert f"rpc {rpc}(" in (ROOT / protos[service]).read_text(), method
    elif prog == "pip":
        import tomllib

        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]
        for spec in args:
            for extra in re.findall(r"\[([\w,]+)\]", spec):
                assert set(extra.split(",")) <= extras.keys(), spec
    elif prog == "curl":  # an HTTP route the server has, with a JSON body it accepts
        from urllib.parse import urlsplit

        from aiohttp import web

        from simclr_embed.server import openai_api, v2_http

        app = web.Application()
        openai_api.add_routes(app)
        v2_http.add_routes(app)
        patterns = [re.sub(r"\{\w+\}", "[^/]+", r.resource.canonical) for r in app.router.routes()]
        path = urlsplit(next(a for a in args if a.startswith("http"))).path
        assert any(re.fullmatch(pat, path) for pat in patterns), path
        body = json.loads(re.sub(r"\$\([^)]*\)", "AAAA", args[args.index("-d") + 1]))
        if path == "/v1/embeddings":
            assert body["model"] == "simclr" and body["input"], body
    elif prog in ("sbatch", "kubectl", "tensorboard"):
        pass  # their file arguments are checked by test_referenced_paths_exist
    elif prog == "ray":
        assert args[0] == "start" and ("--head" in args or "--address" in args), argv
    elif "=" in prog and argv[1] == "sbatch":  # DATA=... sbatch FILE
        pass
    elif prog == "export":  # only the settings the deploy scripts also export
        name = args[0].split("=")[0]
        assert name in (ROOT / "deploy" / "torchrun-multinode.sh").read_text(), argv
    else:
        raise AssertionError(f"README command with no check: {shlex.join(argv)}")


@pytest.mark.parametrize("argv", COMMANDS, ids=[shlex.join(c)[:70] for c in COMMANDS])
def test_command_parses_with_the_real_cli(argv: list[str]) -> None:
    _check(argv)


def test_core_commands_are_documented() -> None:
    joined = [shlex.join(c) for c in COMMANDS]
    for needle in (
        "make demo",
        "make test",
        "torchrun --standalone --nproc-per-node 8 -m simclr_embed.training",
        "--nnodes",
        "--rdzv-endpoint",
        "simclr export-onnx",
        "--fp16",
        "--quantize int8",
        "--triton-repo",
        "simclr serve",
        "simclr embed",
        "docker build --target serve",
        "grpcurl",
        "simclr evaluate",
    ):
        assert any(needle in j for j in joined), needle


def test_referenced_paths_exist() -> None:
    tops = (
        "configs",
        "deploy",
        "docs",
        "proto",
        "bench",
        "simclr_embed",
        "tests",
    )
    pattern = rf"(?<![\w/.$-])((?:{'|'.join(tops)})/[\w./-]*[\w])"
    for path in set(re.findall(pattern, README)):
        if path.startswith("runs/"):
            continue
        assert (ROOT / path).exists(), f"README mentions {path}, which does not exist"
    for link in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
    for path in ("Dockerfile", "Makefile", "pyproject.toml"):
        assert (ROOT / path).is_file()


def test_python_snippets_use_the_real_api() -> None:
    blocks = _blocks("python")
    assert blocks
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = __import__(node.module, fromlist=["_"])
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
        # Methods called on the documented client exist on it.
        if "EmbeddingClient" in block:
            from simclr_embed.client import EmbeddingClient

            used = {
                n.func.attr
                for n in ast.walk(tree)
                if isinstance(n, ast.Call)
                and isinstance(n.func, ast.Attribute)
                and isinstance(n.func.value, ast.Name)
                and n.func.value.id == "client"
            }
            assert used and all(hasattr(EmbeddingClient, m) for m in used), used


def test_inline_bench_commands_exist() -> None:
    """`python bench/X.py --flags` quoted in the benchmarks table: the script has those flags."""
    found = re.findall(r"`python (bench/[\w.]+\.py)([^`]*)`", README)
    assert found
    for script, args in found:
        text = (ROOT / script).read_text()
        for flag in re.findall(r"--[\w-]+", args):
            assert f'"{flag}"' in text, f"{script} has no {flag}"


def test_no_placeholders_left() -> None:
    for placeholder in ("DEMO_REPORT", "BENCHMARKS_TABLE", "DEMO_MINUTES", "TODO"):
        assert placeholder not in README, placeholder
