"""deploy/: the manifests parse and agree with the real CLIs; the health-check script really works."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _k8s_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s.yaml").read_text()) if d]


def _deployment() -> dict:
    (dep,) = [d for d in _k8s_docs() if d["kind"] == "Deployment"]
    return dep


def test_k8s_yaml_parses_with_deployment_and_services() -> None:
    docs = _k8s_docs()
    kinds = [d["kind"] for d in docs]
    assert "Deployment" in kinds and kinds.count("Service") >= 1
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"]
    dep = _deployment()
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert svc["spec"]["selector"].items() <= labels.items()
        container_ports = {
            p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]
        }
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports


def test_k8s_probes_use_grpc_health_on_the_served_port() -> None:
    dep = _deployment()
    assert dep["spec"]["replicas"] >= 2
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    assert f"--port={grpc_port}" in c["args"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["grpc"] == {"port": grpc_port}, probe
    gpu = "nvidia.com/gpu"
    assert c["resources"]["limits"][gpu] == 1 and c["resources"]["requests"][gpu] == 1

    # The pod must outlive the server's drain, or SIGKILL cuts in-flight requests.
    def flag(name: str) -> float:
        return next(float(a.split("=", 1)[1]) for a in c["args"] if a.startswith(f"--{name}="))

    longest = max(flag("grace-s"), flag("drain-delay-s")) + 1  # + the settle before exit
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > longest
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] != 0


def test_k8s_args_are_accepted_by_the_real_serve_cli() -> None:
    from simclr_embed.server.config import build_parser, config_from_args

    (c,) = _deployment()["spec"]["template"]["spec"]["containers"]
    parser = build_parser()
    cfg = config_from_args(parser.parse_args(c["args"]), parser)
    assert cfg.host == "0.0.0.0" and cfg.device == "cuda" and cfg.metrics_port == 9090
    env = {e["name"] for e in c.get("env", [])}
    assert "SIMCLR_AUTH_TOKEN" in env


def test_kserve_inference_service_probes_the_v2_http_port(tiny_onnx: Path) -> None:
    """deploy/kserve.yaml: its args parse; its probes name routes a real server answers."""
    from simclr_embed.server.config import build_parser, config_from_args
    from tests.server.conftest import ServerThread, serve_config
    from tests.server.test_http import call

    (doc,) = [d for d in yaml.safe_load_all((DEPLOY / "kserve.yaml").read_text()) if d]
    assert doc["kind"] == "InferenceService" and doc["apiVersion"].startswith("serving.kserve.io/")
    (c,) = doc["spec"]["predictor"]["containers"]
    parser = build_parser()
    cfg = config_from_args(parser.parse_args(c["args"]), parser)
    assert c["ports"][0]["containerPort"] == cfg.http_port == 8080 and cfg.host == "0.0.0.0"
    assert cfg.model.parent == Path("/mnt/models")  # where KServe's storage initializer writes
    longest = max(cfg.grace_s, cfg.drain_delay_s) + 1
    assert doc["spec"]["predictor"]["terminationGracePeriodSeconds"] > longest
    paths = {c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert all(c[p]["httpGet"]["port"] == 8080 for p in ("readinessProbe", "startupProbe"))
    srv = ServerThread(serve_config(tiny_onnx, http_port=0, model_name=cfg.model_name))
    try:
        for path in paths:
            assert call(f"http://127.0.0.1:{srv.server.http_port}{path}")[0] == 200, path
    finally:
        srv.close()


def _training_argv(script: Path) -> list[str]:
    """The flags a launcher script passes after ``-m simclr_embed.training``, shell variables filled in."""
    text = script.read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if " -m simclr_embed.training" in ln]
    tail = line.split(" -m simclr_embed.training", 1)[1]
    fill = {
        '"$CONFIG"': "configs/imagenet-resnet50.yaml",
        '"$DATA"': "/data",
        '"$OUT"': "/runs/x",
        "$((GLOBAL_BATCH / WORLD))": "128",
    }
    for k, v in fill.items():
        tail = tail.replace(k, v)
    return shlex.split(tail.rstrip().removesuffix("&"))  # the sbatch runs srun in the background


@pytest.mark.parametrize("script", ["slurm/train.sbatch", "torchrun-multinode.sh"])
def test_launcher_scripts(script: str) -> None:
    path = DEPLOY / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    for flag in ("--nnodes", "--nproc-per-node", "--rdzv-backend c10d", "--rdzv-endpoint"):
        assert flag in text
    if script.startswith("slurm"):
        assert "srun" in text and "#SBATCH --nodes" in text
    argv = _training_argv(path)
    from simclr_embed.training.config import get_args_parser

    args = get_args_parser().parse_args(argv)  # exits 2 (fails the test) on an unknown flag
    assert args.batch_size == 128
    assert args.resume == "auto"  # the same command for the first start and every restart
    assert "--max-restarts" in text
    if script.startswith("slurm"):
        assert "#SBATCH --signal=B:USR1@" in text and "scontrol requeue" in text
    config = next(a for a in argv if a.endswith(".yaml"))
    if (ROOT / "configs").is_dir() and any((ROOT / "configs").iterdir()):
        assert (ROOT / config).is_file(), f"{script} uses {config}, which does not exist"


def test_launcher_refuses_missing_settings(tmp_path: Path) -> None:
    r = subprocess.run(
        ["bash", str(DEPLOY / "torchrun-multinode.sh")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert r.returncode != 0 and "NNODES" in r.stderr


def test_triton_notes_use_the_real_export_flags() -> None:
    from simclr_embed.export.cli import get_args_parser

    text = (DEPLOY / "triton" / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:2] == ["simclr", "export-onnx"]
    args = get_args_parser().parse_args(argv[2:])
    assert args.triton_repo == Path("triton_repo")


def test_k8s_training_job_resumes_itself() -> None:
    (job,) = [d for d in yaml.safe_load_all((DEPLOY / "k8s-train.yaml").read_text()) if d]
    assert job["kind"] == "Job" and job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    (c,) = job["spec"]["template"]["spec"]["containers"]
    from torch.distributed.run import get_args_parser as torchrun_parser

    from simclr_embed.training.config import get_args_parser

    assert c["command"] == ["torchrun"]
    run = torchrun_parser().parse_args(c["args"])
    assert (
        run.module and run.training_script == "simclr_embed.training" and int(run.max_restarts) >= 1
    )
    args = get_args_parser().parse_args(run.training_script_args)  # exits 2 on a bad flag
    assert args.resume == "auto" and (ROOT / args.config).is_file()


def test_kuberay_job_runs_a_resumable_embed_on_the_shared_volume() -> None:
    """deploy/kuberay.yaml: its entrypoint is a valid `simclr embed --ray` that resumes, and
    every pod mounts the volume its paths live on."""
    import shlex

    from simclr_embed.embed.cli import parse_config

    (job,) = [d for d in yaml.safe_load_all((DEPLOY / "kuberay.yaml").read_text()) if d]
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["simclr", "embed"]
    cfg = parse_config(argv[2:])
    assert cfg.ray == "auto" and cfg.resume and cfg.fmt == "parquet"
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        for path in (cfg.model, cfg.output, *cfg.paths):
            assert any(str(path).startswith(m + "/") for m in mounts), path
