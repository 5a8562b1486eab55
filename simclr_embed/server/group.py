"""``simclr serve --processes N``: N server processes on one port, one metrics view, one drain.

One Python process serves a few thousand small requests per second — its event loop, gRPC's
per-call work and proto building are the ceiling, not the model (docs/benchmarks.md,
"Serving overhead"). On a GPU node that is less than the GPU can embed, so this starts N
ordinary ``python -m simclr_embed.server`` processes that bind the same port with ``SO_REUSEPORT`` (the kernel
spreads new connections over them), each with its own batcher and runtime — on one GPU that is N
ONNX Runtime sessions and N CUDA streams, like Triton's instance groups — and CPU threads split
between them. This supervisor process:

- picks the port (for ``--port 0``) and starts the workers with ``--worker i/N``;
- says ``SERVING on HOST:PORT (N processes)`` once every worker is warm (each writes a ready
  file), so scripts and probes wait for the whole group;
- serves one ``/metrics`` for all of them (prometheus-client's multiprocess mode: counters and
  histograms summed, the queue gauge summed over live workers);
- forwards SIGTERM/SIGINT to every worker (each drains as a single server does) and exits 0 when
  all did; a worker that dies on its own stops the group with exit 1, so an orchestrator restarts
  it rather than serving at reduced capacity unnoticed.

Health is per worker: a probe answers from whichever worker its connection lands on, and they all
start and drain together.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simclr_embed.inference.runtime import usable_cores
from simclr_embed.server.config import ServeConfig
from simclr_embed.server.ports import address, touch_atomically

log = logging.getLogger(__name__)

READY_PREFIX = "ready-"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def worker_argv(
    argv: list[str],
    cfg: ServeConfig,
    port: int,
    index: int,
    ready: Path,
    http_port: int | None = None,
) -> list[str]:
    """The group's own command line for worker ``index``.

    The user's flags are kept as given (abbreviated or ``--flag=value`` alike) and the worker's
    settings are appended: argparse takes the last occurrence, so these win. Threads are split
    between the workers unless the user set them; ``--metrics-port`` is ignored by a worker.
    """
    n = cfg.processes
    cores = usable_cores()
    out = [*argv, "--port", str(port), "--worker", f"{index}/{n}", "--ready-file", str(ready)]
    if http_port is not None:  # the group's one HTTP port, shared like the gRPC one
        out += ["--http-port", str(http_port)]
    if not cfg.decode_threads:
        out += ["--decode-threads", str(max(1, cores // n))]
    if not cfg.intra_op_threads:
        out += ["--intra-op-threads", str(max(1, cores // (n * (cfg.max_inflight or 2))))]
    return out


def run_group(cfg: ServeConfig, argv: list[str]) -> int:
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    n = cfg.processes
    port = cfg.port or _free_port(cfg.host)
    http_port = None if cfg.http_port is None else cfg.http_port or _free_port(cfg.host)
    state = Path(tempfile.mkdtemp(prefix="simclr-serve-"))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(state)}
    workers: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        log.info("%s: stopping %d worker(s)", signal.Signals(signum).name, len(workers))
        stopping = True
        for w in workers:
            if w.poll() is None:
                w.send_signal(signum)  # the first drains, a second one hurries, as for one server

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    metrics_http = None
    try:
        for i in range(n):
            ready = state / f"{READY_PREFIX}{i}"
            cmd = [
                sys.executable,
                "-m",
                "simclr_embed.server",
                *worker_argv(argv, cfg, port, i, ready, http_port),
            ]
            # Own session: a terminal's Ctrl-C reaches only the supervisor, which forwards it
            # once (a worker that got it twice would cut its drain short).
            workers.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        if cfg.metrics_port is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(state))
            metrics_http, _ = start_http_server(cfg.metrics_port, addr=cfg.host, registry=registry)
            log.info("metrics on http://%s:%d/metrics", cfg.host, metrics_http.server_port)
        announced = False
        while True:
            codes = [w.poll() for w in workers]
            if all(c is not None for c in codes):
                break
            if not stopping and any(c is not None for c in codes):
                dead = next(i for i, c in enumerate(codes) if c is not None)
                log.error("worker %d/%d exited with %s: stopping the group", dead, n, codes[dead])
                stopping = True
                for w in workers:
                    if w.poll() is None:
                        w.send_signal(signal.SIGTERM)
            if not announced and all((state / f"{READY_PREFIX}{i}").exists() for i in range(n)):
                if http_port is not None:
                    log.info("HTTP on %s (%d processes)", address(cfg.host, http_port), n)
                log.info("SERVING on %s (%d processes)", address(cfg.host, port), n)
                if cfg.ready_file is not None:
                    touch_atomically(cfg.ready_file)
                announced = True
            time.sleep(0.05)
        for w in workers:
            multiprocess.mark_process_dead(w.pid, path=str(state))
        codes = [w.returncode for w in workers]
        log.info("stopped; worker exit codes %s", codes)
        return 0 if all(c == 0 for c in codes) and stopping else 1
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        if metrics_http is not None:
            metrics_http.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(state, ignore_errors=True)
