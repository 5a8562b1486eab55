"""What each scale-out fault costs, measured with the same real processes the tests use
(tests/training/test_multinode.py, tests/embed/test_ray_cluster.py, tests/server/test_replicas.py)
at a larger size. Results: docs/benchmarks.md "Scale-out".

    .venv/bin/python bench/scale_out.py [--images 10000] [--steps 120]

1. torchrun, 2 agents × 1 gloo worker: an uninterrupted run vs a node SIGKILLed at 1/3 and
   started again (wall time, steps redone from last.pt, time from the kill to training again).
2. Ray, ``ray start`` head + 2 worker raylets: ``simclr embed --ray`` clean vs a worker node
   SIGKILLed after 1/3 of the parts (wall time, img/s).
3. Three ``simclr serve`` replicas: ``simclr embed --target a,b,c`` clean vs one replica SIGKILLed
   and restarted vs a rolling restart (wall time, img/s).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import write_checkpoint, write_image_folder  # noqa: E402
from tests.embed import test_ray_cluster as rc  # noqa: E402
from tests.server import test_replicas as rp  # noqa: E402
from tests.training import test_multinode as mn  # noqa: E402


def torchrun_faults(work: Path, steps: int) -> None:
    data = write_image_folder(work / "train", per_class=8)
    mn.STEPS = steps

    def run(name: str, kill_at: int | None) -> tuple[float, list[int], float]:
        out, port = work / name, mn._port()
        torchrun = mn._multinode("2", port, "--max-restarts", "3")
        started = time.monotonic()
        host = mn.Agent(work / f"{name}-host.log", torchrun, mn._train_args(data, out))
        time.sleep(1.0)
        other = mn.Agent(work / f"{name}-other.log", torchrun, mn._train_args(data, out))
        gap, again = 0.0, None
        try:
            if kill_at is not None:
                mn._wait_for_step([host], kill_at)
                other.kill()
                killed = time.monotonic()
                again = mn.Agent(work / f"{name}-again.log", torchrun, mn._train_args(data, out))
                mn._wait_for_step([host], kill_at + 1, timeout=300)  # logged again after resume
                gap = time.monotonic() - killed
            assert host.wait(600) == 0, host.text()[-2000:]
        finally:
            for a in (host, other, again):
                if a is not None:
                    a.kill()
        return time.monotonic() - started, mn._resumed_from(host.text()), gap

    clean, _, _ = run("clean", None)
    kill_at = steps // 3 + 2
    faulted, resumed, gap = run("lost", kill_at)
    redone = kill_at - resumed[-1] if resumed else -1
    print(f"| torchrun 2 nodes, {steps} steps, checkpoint every {mn.EVERY} | clean {clean:.1f} s "
          f"| node lost at step {kill_at} and restarted: {faulted:.1f} s (+{faulted - clean:.1f} s; "
          f"kill → training again {gap:.1f} s; steps redone {redone}) |", flush=True)  # fmt: skip


def ray_faults(work: Path, model: Path, images: int) -> None:
    photos = write_image_folder(work / "ray-photos", per_class=images // 3, size=16)
    n = 3 * (images // 3)
    cluster = rc.Cluster().start()
    try:
        timings = {}
        for name, lose in (("clean", False), ("worker lost", True)):
            out = work / f"ray-{name.replace(' ', '-')}"
            started = time.monotonic()
            proc = rc._driver(cluster, model, photos, out, "--batch", "64")
            if lose:
                rc._wait_parts(out, max(1, n // 64 // 3), proc, timeout=600)
                cluster.lose_node(cluster.workers[-1])
            rc._finish(proc, timeout=900)
            timings[name] = time.monotonic() - started
        c, f = timings["clean"], timings["worker lost"]
        print(f"| Ray, head + 2 workers, {n} images | clean {c:.1f} s ({n / c:.0f} img/s) | a "
              f"worker node SIGKILLed at 1/3: {f:.1f} s ({n / f:.0f} img/s, +{f - c:.1f} s) |", flush=True)  # fmt: skip
    finally:
        cluster.stop()


def replica_faults(work: Path, model: Path, images: int) -> None:
    photos = write_image_folder(work / "rep-photos", per_class=images // 3, size=16)
    n = 3 * (images // 3)
    replicas = rp.Replicas(model)
    try:
        timings = {}
        for name in ("clean", "one killed", "rolling restart"):
            out = work / f"rep-{name.replace(' ', '-')}.npy"
            started = time.monotonic()
            proc = rp._embed(replicas.target, photos, out)
            rp._wait_parts(out, 1, proc, timeout=300)
            if name == "one killed":
                replicas.procs[1].kill()
                replicas.start(1)
            elif name == "rolling restart":
                for i in range(3):
                    replicas.procs[i].terminate()
                    replicas.procs[i].wait(60)
                    replicas.start(i)
            _, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err[-2000:]
            timings[name] = time.monotonic() - started
        c = timings["clean"]
        parts = [f"{k} {v:.1f} s ({n / v:.0f} img/s)" for k, v in timings.items()]
        print(f"| 3 replicas, `--target a,b,c --batch 2 --concurrency 1`, {n} images | "
              + " | ".join(parts) + f" | (clean {c:.1f} s) |", flush=True)  # fmt: skip
    finally:
        replicas.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--steps", type=int, default=120)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="simclr-scale-out-"))
    import torch

    from simclr_embed.export.onnx_export import export_checkpoint
    from simclr_embed.training.model import SimCLRModel

    torch.manual_seed(0)  # the tests' tiny model: untrained resnet18 at 32 px
    cfg = {"arch": "resnet18", "stem": "standard", "image_size": 32, "proj_dim": 32,
           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip
    ckpt = write_checkpoint(work / "tiny.pt", SimCLRModel("resnet18", "standard", 32), cfg, 0)
    model = work / "tiny.onnx"
    export_checkpoint(ckpt, model, verify=False)
    print("| scenario | baseline | with the fault |\n|---|---|---|")
    torchrun_faults(work, args.steps)
    ray_faults(work, model, args.images)
    replica_faults(work, model, args.images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
