"""Soak + drain: many clients of mixed traffic for a while, then SIGTERM under load.

    .venv/bin/python bench/soak.py                       # 64 clients × 60 s, resnet18 @ 32 px, CPU
    .venv/bin/python bench/soak.py --clients 16 --seconds 10

What runs (127.0.0.1 only; every loop bounded by --seconds and --max-calls):
  server  `python -m simclr_embed.server` in its own process (tiny freshly initialized model, exported by the
          real exporter and cached in runs/bench-soak/).
  load    --clients coroutines on grpc.aio, each its own channel, plain stubs (no retries: every
          outcome is what the server answered). Per call: 1-4 images (JPEG or raw), features or
          projection, normalized or not; 10 % with a tiny deadline (1-5 ms), 5 % cancelled by
          the client 0-5 ms after sending, the rest a 30 s deadline.
  drain   after --seconds, SIGTERM while the load keeps going; clients stop when the port closes.

Prints outcomes per code (before / after the signal), images/s, the server's RSS at start and
end, its exit code and drain time, and whether the books balance: every call the server
counted is one the clients saw with the same code (OK exactly; UNAVAILABLE = refusals while
draining), no CANCELLED that a client did not cause, nothing lost before the signal.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb  # noqa: E402
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc  # noqa: E402


def build_model(out_dir: Path) -> Path:
    sys.path.insert(0, str(REPO / "bench"))
    from serve import build_model as build  # the serving benchmark's cached tiny model

    return build("resnet18", 32, "standard", out_dir)


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024


def images_pool(n: int = 16) -> list[pb.Image]:
    rng = np.random.default_rng(0)
    pool = []
    for i in range(n):
        arr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        if i % 2:
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=85)
            pool.append(pb.Image(encoded=buf.getvalue()))
        else:
            raw = pb.RawImage(pixels=arr.tobytes(), height=48, width=64, channels=3)
            pool.append(pb.Image(raw=raw))
    return pool


async def client(
    k: int, target: str, end: float, max_calls: int, signalled: list[float], log: list[tuple]
) -> None:
    rng = random.Random(k)
    pool = images_pool()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for _ in range(max_calls):
            if time.monotonic() > end:
                return
            n = rng.randint(1, 4)
            request = pb.EmbedRequest(
                images=rng.sample(pool, n),
                kind=rng.choice((pb.EMBEDDING_KIND_FEATURES, pb.EMBEDDING_KIND_PROJECTION)),
                l2_normalize=rng.random() < 0.5,
            )
            r = rng.random()
            timeout = rng.uniform(0.001, 0.005) if r < 0.10 else 30.0
            sent = time.monotonic()
            call = stub.Embed(request, timeout=timeout)
            we_cancelled = False
            if 0.10 <= r < 0.15:
                await asyncio.sleep(rng.uniform(0, 0.005))
                we_cancelled = call.cancel()
            try:
                await call
                code, details = "OK", ""
            except asyncio.CancelledError:
                code, details = "CANCELLED", "by the client"
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code().name, exc.details() or ""
            after = bool(signalled) and sent >= signalled[0]
            log.append((sent, code, details, we_cancelled, n, after))
            if code == "UNAVAILABLE" and "draining" not in details:
                return  # the port closed: this server is gone


async def run_load(args: argparse.Namespace, target: str, proc: subprocess.Popen) -> dict:
    log: list[tuple] = []
    signalled: list[float] = []
    end = time.monotonic() + args.seconds + args.drain_load_s
    tasks = [
        asyncio.create_task(client(k, target, end, args.max_calls, signalled, log))
        for k in range(args.clients)
    ]
    await asyncio.sleep(args.seconds)
    rss_end = rss_mib(proc.pid)
    signalled.append(time.monotonic())
    proc.send_signal(signal.SIGTERM)
    exit_code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60)
    stopped = time.monotonic()
    await asyncio.gather(*tasks)
    return {"log": log, "signalled": signalled[0], "stopped": stopped, "exit": exit_code,
            "rss_end": rss_end}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0, help="load before the SIGTERM")
    p.add_argument("--drain-load-s", type=float, default=10.0, help="most load after it")
    p.add_argument("--max-calls", type=int, default=200_000, help="per client")
    p.add_argument("--grace-s", type=float, default=10.0)
    p.add_argument("--drain-delay-s", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-soak")
    args = p.parse_args()
    model = build_model(args.out)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = args.out / "server.log"
    with open(log_path, "w") as server_log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "simclr_embed.server", "--model", str(model), "--port", "0",
             "--device", "cpu", "--max-batch-size", "32", "--max-queue", "256",
             "--grace-s", str(args.grace_s), "--drain-delay-s", str(args.drain_delay_s)],
            cwd=REPO, env=env, stdout=server_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            port = None
            for _ in range(1200):
                found = re.search(r"SERVING on 127\.0\.0\.1:(\d+)", log_path.read_text())
                if found:
                    port = int(found.group(1))
                    break
                if proc.poll() is not None:
                    sys.exit(f"server exited: {log_path.read_text()}")
                time.sleep(0.1)
            assert port, "server not SERVING after 120 s"
            rss_start = rss_mib(proc.pid)
            t0 = time.monotonic()
            result = asyncio.run(run_load(args, f"127.0.0.1:{port}", proc))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    report(args, result, rss_start, t0, log_path.read_text())
    return 0


def report(args: argparse.Namespace, r: dict, rss_start: float, t0: float, server_log: str) -> None:
    log, signalled = r["log"], r["signalled"]
    before = Counter(code for sent, code, *_ in log if sent < signalled)
    after = Counter(code for sent, code, *_ in log if sent >= signalled)
    ok_images = sum(n for sent, code, _, _, n, _ in log if code == "OK" and sent < signalled)
    last = server_log.strip().splitlines()[-1] if server_log.strip() else ""
    counted: dict[str, int] = {}
    if "answered:" in last:
        counted = {
            k: int(v) for k, v in (x.split("=") for x in last.split("answered: ")[1].split())
        }
    seen_ok = before["OK"] + after["OK"]
    draining = sum(1 for _, _, details, *_ in log if "draining" in details)
    # A refusal the client did not wait for (its own cancel or tiny deadline) is counted by the
    # server but seen by the client as what it caused: the only slack in the books.
    gave_up_after = sum(1 for sent, code, *_ in log
                        if sent >= signalled and code in ("CANCELLED", "DEADLINE_EXCEEDED"))  # fmt: skip
    stray_cancel = sum(1 for _, code, _, ours, _, _ in log if code == "CANCELLED" and not ours)
    lost = sum(1 for sent, code, *_ in log
               if sent < signalled - 0.5 and code not in ("OK", "DEADLINE_EXCEEDED", "CANCELLED",
                                                          "RESOURCE_EXHAUSTED"))  # fmt: skip
    print(f"soak: {args.clients} clients × {args.seconds:.0f} s, then SIGTERM under load")
    print(f"  before the signal: {dict(sorted(before.items()))}")
    print(f"  after the signal:  {dict(sorted(after.items()))}")
    print(f"  served: {ok_images / (signalled - t0):.0f} img/s ({before['OK'] / (signalled - t0):.0f} "
          f"OK calls/s) before the signal")  # fmt: skip
    print(f"  server RSS: {rss_start:.0f} MiB at start, {r['rss_end']:.0f} MiB at the end")
    print(f"  server exit {r['exit']}, {r['stopped'] - signalled:.2f} s after SIGTERM "
          f"(drain delay {args.drain_delay_s:g} s, grace {args.grace_s:g} s)")  # fmt: skip
    print(f"  server counted: {counted}")
    refused = counted.get("UNAVAILABLE", 0)
    books = (counted.get("OK") == seen_ok and abs(refused - draining) <= gave_up_after
             and stray_cancel == 0 and lost == 0 and r["exit"] == 0)  # fmt: skip
    print(
        f"  OK seen {seen_ok} / counted {counted.get('OK')}; draining refusals seen "
        f"{draining} / counted {counted.get('UNAVAILABLE', 0)}; CANCELLED not caused by a "
        f"client: {stray_cancel}; failures sent >0.5 s before the signal: {lost}"
    )
    print(f"  every accepted request answered exactly once: {'YES' if books else 'NO'}")


if __name__ == "__main__":
    raise SystemExit(main())
