"""What tracing costs the server: the same do-nothing model served by (a) the code before tracing
existed (a git worktree of ``--before``), (b) today's code with tracing off, (c) today's code
exporting every request's spans (100 % sampling) to an OTLP/gRPC receiver in this process.
Results: docs/benchmarks.md "Tracing".

    .venv/bin/python bench/tracing_overhead.py --before f7993ab

Load: bench/serve_overhead.py's closed-loop gRPC clients, 1 raw 32×32 image per request (where
per-request costs show most), 16 clients for throughput and 1 client for p50, the three servers
alternated round by round so a noisy machine slows each alike.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402
from serve_overhead import load, noop_model, request_images  # noqa: E402

from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb  # noqa: E402


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans, self.lock = 0, threading.Lock()

    def Export(self, request: object, context: object) -> object:
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)  # type: ignore[attr-defined]
        with self.lock:
            self.spans += n
        return trace_service_pb2.ExportTraceServiceResponse()


def start(code: Path, model: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "simclr_embed.server", "--model", str(model), "--port", "0",
         "--device", "cpu", "--max-batch-size", "64", "--drain-delay-s", "0", *extra],
        cwd=code, env={**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if "SERVING on 127.0.0.1:" in line:
            port = line.split("SERVING on 127.0.0.1:")[1].split()[0].rstrip(":,")
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, f"127.0.0.1:{port}"
    raise RuntimeError(f"server from {code} did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="f7993ab", help="the commit before tracing [f7993ab]")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="simclr-trace-bench-"))
    before = work / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT,
                   check=True, capture_output=True)  # fmt: skip
    receiver = Receiver()
    otlp = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, otlp)
    otlp_port = otlp.add_insecure_port("127.0.0.1:0")
    otlp.start()
    model = noop_model(work / "noop.onnx")
    servers = {}
    try:
        servers["before tracing existed"] = start(before, model)
        servers["tracing off"] = start(ROOT, model)
        servers["tracing on, 100 % sampled"] = start(ROOT, model, "--otlp-endpoint", f"127.0.0.1:{otlp_port}")  # fmt: skip
        request = pb.EmbedRequest(images=request_images("raw", 1), kind=pb.EMBEDDING_KIND_FEATURES)
        rps: dict[str, list[float]] = {k: [] for k in servers}
        p50: dict[str, list[float]] = {k: [] for k in servers}
        for _ in range(args.rounds):
            for name, (_, target) in servers.items():
                rps[name].append(asyncio.run(load(target, 16, args.seconds, request))["rps"])
                p50[name].append(asyncio.run(load(target, 1, args.seconds, request))["p50_ms"])
        time.sleep(1.5)  # the last spans' export
        base = statistics.median(rps["before tracing existed"])
        print(f"noop model, 1 raw 32x32 image per request, median of {args.rounds} alternated rounds of {args.seconds:.0f} s")  # fmt: skip
        print("| server | req/s at 16 clients | vs before | p50 at 1 client |\n|---|---|---|---|")
        for name in servers:
            r = statistics.median(rps[name])
            print(f"| {name} | {r:.0f} | {r / base:.3f}× | {statistics.median(p50[name]):.2f} ms |")
        print(f"spans received by the OTLP receiver: {receiver.spans}")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
        otlp.stop(0)
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
