"""The shipped Grafana dashboard and Prometheus alert rules query only what a real server
exports (its ``/metrics`` scraped after real calls), the rules pass ``promtool check rules`` and
fire in ``promtool test rules`` on the series that should fire them (Debian's ``prometheus``
package, installed by .ci/run; skipped with the reason where promtool cannot be had)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from simclr_embed.client import EmbeddingClient
from simclr_embed.server.gpu_metrics import NAMES as GPU_NAMES
from tests.server.conftest import REPO, ServerThread, encode, photo, serve_config

DASHBOARD = REPO / "deploy" / "grafana" / "simclr-serve.json"
RULES = REPO / "deploy" / "prometheus" / "simclr-alerts.yaml"
# Metric names in PromQL: ours, the process collector's, and Prometheus's own `up`.
NAME = re.compile(r"\b((?:simclr|process)_[a-z0-9_]+|up)\b(?=\s*[{\[)])")


@pytest.fixture(scope="module")
def exported(tiny_onnx: Path) -> Iterator[tuple[set[str], dict[str, float]]]:
    """Every sample name on a real server's /metrics after a few calls, and a few values."""
    server = ServerThread(serve_config(tiny_onnx, metrics_port=0))
    try:
        with EmbeddingClient(server.target) as client:
            client.embed([encode(photo(40, 30, seed=i), "PNG") for i in range(3)])
        port = server.server.metrics_port
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
    finally:
        server.close()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    yield {s.name for s in samples}, {s.name: s.value for s in samples if not s.labels}


def _dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def _rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def test_every_queried_metric_is_exported(exported: tuple[set[str], dict[str, float]]) -> None:
    names, _ = exported
    exprs = _dashboard_exprs() + _rule_exprs()
    queried = {m for e in exprs for m in NAME.findall(e)}
    assert {"simclr_requests_total", "simclr_queue_seconds_bucket", "simclr_ready"} <= queried
    missing = queried - names - set(GPU_NAMES) - {"up"}  # GPU: NVML only; up: Prometheus's own
    assert not missing, f"queried but not exported: {sorted(missing)}"
    assert set(GPU_NAMES) & queried, "the dashboard shows GPU utilisation and memory"


def test_readiness_capacity_and_process_metrics(
    exported: tuple[set[str], dict[str, float]],
) -> None:
    names, values = exported
    assert values["simclr_ready"] == 1.0  # SERVING
    assert values["simclr_queue_capacity_images"] == 1024  # --max-queue's default
    assert values["process_resident_memory_bytes"] > 10 * 2**20
    assert values["process_open_fds"] > 0 and "process_cpu_seconds_total" in names


def test_dashboard_is_importable() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "simclr-serve" and doc["__inputs"][0]["name"] == "DS_PROMETHEUS"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:  # every panel on the one datasource input, with a query
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}" and p["targets"], p["title"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: apt-get install prometheus)")  # fmt: skip
def test_promtool_checks_and_tests_the_rules() -> None:
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "5 rules found" in check.stdout + check.stderr
    test = subprocess.run(["promtool", "test", "rules", RULES.with_name("simclr-alerts.test.yaml").name],
                          cwd=RULES.parent, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert test.returncode == 0, test.stdout + test.stderr
