"""Preemption: how long from SIGTERM to exit 0 (checkpoint written), and what the per-step stop
agreement costs — ResNet-50 at 224 px on this CPU.

    .venv/bin/python bench/preempt.py                 # resnet50 224 px, batch 4, 3 signals
    .venv/bin/python bench/preempt.py --arch resnet18 --image-size 64

What runs: `python -m simclr_embed.training` as a process on generated photos (--max-steps far away); after
step 2 (and then at a random moment of a later step) SIGTERM; the time until the process exits
0, split into "finishing the step in progress" and "writing last.pt" from its log. The stop
agreement (one all-reduce of one int on the host, every step) is measured in
bench/train_step.py (--stop-check-processes 2).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from gpu_steps import _write_photo  # noqa: E402


def _read_lines(proc: subprocess.Popen[str], lines: list[tuple[float, str]]) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append((time.perf_counter(), line))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--signals", type=int, default=3, help="runs, each stopped by one SIGTERM")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-preempt")
    args = p.parse_args()
    data = args.work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(32):
        if not (data / f"{i:03d}.jpg").exists():
            _write_photo((data / f"{i:03d}.jpg", i, 320, 256))
    rng = random.Random(0)
    rows = []
    for k in range(args.signals):
        out = args.work / f"run{k}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [sys.executable, "-m", "simclr_embed.training", "--data", str(data), "--out", str(out),
               "--device", "cpu", "--arch", args.arch, "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--max-steps", "1000", "--workers", "1",
               "--log-every", "1", "--no-progress", "--checkpoint-every", "1000"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        lines: list[tuple[float, str]] = []
        reader = threading.Thread(target=_read_lines, args=(proc, lines), daemon=True)
        reader.start()
        while not any("step 2/" in ln for _, ln in lines):
            if proc.poll() is not None:
                raise SystemExit("".join(ln for _, ln in lines)[-3000:])
            time.sleep(0.05)
        steps = [t for t, ln in lines if re.search(r"step \d+/1000", ln)]
        step_s = steps[-1] - steps[-2]
        time.sleep(rng.uniform(0, step_s))  # somewhere in the next step
        sent = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(600)
        done = time.perf_counter()
        reader.join(10)
        last_step = max(t for t, ln in lines if re.search(r"step \d+/1000", ln))
        wrote = next(t for t, ln in lines if "last.pt (step" in ln)
        rows.append((done - sent, last_step - sent, wrote - last_step, step_s, code))
        print(f"  signal {k + 1}: exit {code} after {done - sent:.1f} s (step {last_step - sent:.1f}"
              f" s, checkpoint {wrote - last_step:.1f} s; a step takes {step_s:.1f} s)", flush=True)  # fmt: skip
    total = statistics.median(r[0] for r in rows)
    ckpt = statistics.median(r[2] for r in rows)
    size = (args.work / "run0" / "checkpoints" / "last.pt").stat().st_size / 2**20
    print(f"\n{args.arch} {args.image_size} px, batch {args.batch_size}, {os.cpu_count()} CPUs: "
          f"SIGTERM -> exit 0 in {total:.1f} s median (<= one step {statistics.median(r[3] for r in rows):.1f} s "
          f"+ last.pt {size:.0f} MiB in {ckpt:.1f} s); exit codes {[r[4] for r in rows]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
