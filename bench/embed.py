"""Bulk embedding benchmark: the same JPEGs offline, through `simclr serve` and through Ray,
beside a tight in-process loop, in one run; and the client's peak memory at 2k vs 20k images.

    .venv/bin/python bench/embed.py                      # 2,000 JPEGs 640x480, resnet18 @ 64 px
    .venv/bin/python bench/embed.py --images 500 --rounds 1 --no-ray

What runs (127.0.0.1 only; bounded by the image counts):
  loop     a tight in-process loop: decode + preprocess (the server's Preprocessor, a thread per
           core) then session.run, --batch images at a time: the reference.
  offline  simclr_embed.embed.job.run_job with simclr_embed.embed.offline.OfflineEmbedder — what `simclr embed --model`
           runs — into an .npy (written as it goes, as always).
  server   the same job through `python -m simclr_embed.server` (its own process) with the client engine of
           `simclr embed --target` (per-image errors, --concurrency requests in flight).
  ray      simclr_embed.embed.ray_job.run_ray on a local Ray already started (its start-up not counted).
  memory   `simclr embed` as a child process over 2,000 and 20,000 small images (the same folder
           listed 10 times): peak RSS of the child (ru_maxrss), offline and through the server.
Phases take turns for --rounds rounds; images/s are medians. Goals (issue 12): offline >= 0.9 x
loop, server >= 0.8 x offline, peak RSS flat in N (within 10 %).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_steps import _write_photo  # noqa: E402  (photo-like JPEG writer)
from serve import build_model, start_process, stop_process  # noqa: E402


def make_jpegs(folder: Path, n: int, width: int, height: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{i:05d}.jpg", i, width, height) for i in range(n)]
    todo = [j for j in jobs if not j[0].exists()]
    with concurrent.futures.ProcessPoolExecutor() as pool:
        list(pool.map(_write_photo, todo, chunksize=16))
    return [j[0] for j in jobs]


def tight_loop(model: Path, paths: list[Path], batch: int) -> float:
    from simclr_embed.inference.images import Preprocessor
    from simclr_embed.inference.runtime import OnnxRuntime, usable_cores

    runtime = OnnxRuntime(model, device="cpu", max_batch_size=batch)
    pre = Preprocessor(runtime.info.image_size, runtime.info.resize)
    with concurrent.futures.ThreadPoolExecutor(usable_cores()) as pool:
        t0 = time.perf_counter()
        for i in range(0, len(paths), batch):
            blobs = [p.read_bytes() for p in paths[i : i + batch]]
            runtime.encode(np.stack(list(pool.map(pre.from_encoded, blobs))))
        return len(paths) / (time.perf_counter() - t0)


def job_rate(engine: object, folder: Path, out: Path, n: int) -> float:
    from simclr_embed.embed.job import JobConfig, run_job

    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_job(JobConfig((folder,), out), engine)  # type: ignore[arg-type]
    assert summary.rows == n, summary
    return n / (time.perf_counter() - t0)


def peak_rss_mib(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; its peak RSS (MiB, VmHWM of the exec'd program, polled) and wall seconds.

    Not ``ru_maxrss``: Linux carries the forking parent's peak over ``exec`` into it.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            found = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.MULTILINE)
        except OSError:  # gone between poll() and the read
            break
        if found:
            peak = max(peak, int(found.group(1)) / 1024)
        time.sleep(0.05)
    if proc.wait():
        raise RuntimeError(f"{cmd[3:6]} failed: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
    return peak, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--stem", default="standard", choices=("small", "medium", "standard"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight (server)")
    p.add_argument("--rounds", type=int, default=2, help="0: only the memory part")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--memory-images", type=int, nargs=2, default=[2000, 20000])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-embed")
    args = p.parse_args()

    from simclr_embed.client import EmbeddingClient
    from simclr_embed.embed.cli import _Remote
    from simclr_embed.embed.offline import OfflineEmbedder

    work = args.work
    model = build_model(args.arch, args.image_size, args.stem, work)
    folder = work / f"jpegs-{args.width}x{args.height}"
    paths = make_jpegs(folder, args.images, args.width, args.height)[: args.images]
    print(f"{len(paths)} JPEGs {args.width}x{args.height}, model {model.name}, batch {args.batch}, "
          f"{os.cpu_count()} CPUs, {args.rounds} rounds", flush=True)  # fmt: skip
    server, m, _ = start_process(
        [sys.executable, "-m", "simclr_embed.server", "--model", str(model), "--port", "0", "--device", "cpu",
         "--max-batch-size", str(args.batch), "--drain-delay-s", "0", "--max-queue", "4096"],
        r"SERVING on 127\.0\.0\.1:(\d+)",
    )  # fmt: skip
    target = f"127.0.0.1:{m.group(1)}"
    ray = None
    if not args.no_ray and args.rounds:
        import ray

        ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    rates: dict[str, list[float]] = {"loop": [], "offline": [], "server": [], "ray": []}
    try:
        for r in range(args.rounds):
            rates["loop"].append(tight_loop(model, paths, args.batch))
            with OfflineEmbedder(model, device="cpu", batch=args.batch) as engine:
                rates["offline"].append(job_rate(engine, folder, work / "off.npy", len(paths)))
            with EmbeddingClient(target, max_batch=args.batch, timeout=300) as client:
                remote = _Remote(client, args.concurrency)
                rates["server"].append(job_rate(remote, folder, work / "srv.npy", len(paths)))
            if ray is not None:
                rates["ray"].append(ray_rate(model, paths, work / "ray", args.batch))
            print(
                f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items() if v),
                flush=True,
            )
        # Memory: the CLI as a child process, offline and through the server.
        small = make_jpegs(work / "small", args.memory_images[0], 64, 48)
        mem = {}
        for label, where in (
            ("offline", ["--model", str(model)]),
            ("server", ["--target", target]),
        ):
            for n in args.memory_images:
                repeats = n // len(small)
                out = work / f"mem-{label}-{n}.npy"
                shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
                cmd = [sys.executable, "-m", "simclr_embed.cli", "embed", *where, "--output",
                       str(out), "--no-progress", "--batch", str(args.batch), *[str(work / "small")] * repeats]  # fmt: skip
                mem[(label, n)] = peak_rss_mib(cmd)
    finally:
        stop_process(server)
        if ray is not None:
            ray.shutdown()
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    if med:
        print("\n| path | images/s | vs loop |")
        print("|---|---:|---:|")
        for k, v in med.items():
            print(f"| {k} | {v:.0f} | {v / med['loop']:.2f}× |")
    print("\n| client | images | peak RSS MiB | wall s |")
    print("|---|---:|---:|---:|")
    for (label, n), (rss, wall) in mem.items():
        print(f"| {label} | {n} | {rss:.0f} | {wall:.1f} |")
    print()
    if med:
        print(f"offline / loop = {med['offline'] / med['loop']:.2f} (goal >= 0.9)")
        print(f"server / offline = {med['server'] / med['offline']:.2f} (goal >= 0.8)")
    if "ray" in med:
        print(
            f"ray / offline = {med['ray'] / med['offline']:.2f} (local Ray, start-up not counted)"
        )
    for label in ("offline", "server"):
        a, b = (mem[(label, n)][0] for n in args.memory_images)
        print(
            f"{label} peak RSS {args.memory_images[1]} vs {args.memory_images[0]} images: {b / a:.2f}x (goal <= 1.10)"
        )
    return 0


def ray_rate(model: Path, paths: list[Path], out: Path, batch: int) -> float:
    from simclr_embed.embed.ray_job import run_ray
    from simclr_embed.inference.runtime import OnnxRuntime

    info = OnnxRuntime(model, device="cpu").info
    job = {"format": "parquet", "model_version": info.model_version, "kind": "features",
           "normalize": False, "dimension": info.feature_dim}  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    rows, _ = run_ray(None, model, [str(p) for p in paths], out, kind="features", normalize=False,
                      on_error="skip", batch=batch, device="cpu", job=job, info=info,
                      max_pixels=50_000_000)  # fmt: skip
    assert rows == len(paths)
    return len(paths) / (time.perf_counter() - t0)


if __name__ == "__main__":
    raise SystemExit(main())
