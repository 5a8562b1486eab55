"""``bench/gpu_check.sh --dry-run``: every step of the GPU check runs on the CPU (tiny sizes, CPU
twins), so its command lines cannot rot between the rare sessions that are lent a GPU."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = (
    "env", "sample_data", "jpegs", "train_smoke", "train_jpeg_workers", "train_jpeg_device",
    "train_synth", "gradcache", "export_fp32",
    "export_fp16", "parity", "serve_torch", "bench_serve_torch", "bench_serve_ort", "nvjpeg",
)  # fmt: skip
# On a CPU these cannot run their GPU part; each must say why (its last line).
SKIPPED = {"bench_serve_ort": "dry run", "nvjpeg": "no CUDA device"}


@pytest.mark.slow
def test_dry_run_every_step_passes_or_skips_with_a_reason(tmp_path: Path) -> None:
    env = {**os.environ, "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = {
        m.group(1): (m.group(2), m.group(3))
        for m in re.finditer(r"^\| (\w+) \| (\w+(?:\(\S+\))?) \| \d+ \| (.*) \|$", table, re.M)
    }
    assert list(rows) == list(STEPS), table
    for name, (status, note) in rows.items():
        if name in SKIPPED:
            assert status == "SKIP" and SKIPPED[name] in note, (name, status, note)
        else:
            assert status == "PASS", (name, status, note)
    assert "DRY RUN" in table.splitlines()[0]
    assert "torch bf16 cos" in rows["parity"][1] and "P3" in rows["bench_serve_torch"][1]
    assert all("data wait" in rows[f"train_jpeg_{w}"][1] for w in ("workers", "device"))
    assert (tmp_path / "out" / "gpu_check-logs.tgz").stat().st_size > 0
