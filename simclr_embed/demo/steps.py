"""The demo's building blocks: run a ``simclr`` subcommand, a server subprocess, the kNN score.

Kept apart from ``simclr_embed.demo`` (the driver) so each reads in one sitting. Every stage runs
as its real CLI in a subprocess through this interpreter, exactly as a user would type it.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from simclr_embed.errors import SimclrError

if TYPE_CHECKING:
    import numpy as np


def simclr_argv(*args: str) -> list[str]:
    """The ``simclr`` console command, run through this interpreter (works without PATH set-up)."""
    return [sys.executable, "-m", "simclr_embed.cli", *args]


def show_command(args: Sequence[str], env: dict[str, str] | None = None) -> None:
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
    print(f"\n$ {prefix}simclr {shlex.join(args)}", flush=True)


def run_simclr(*args: str, capture: bool = False, env: dict[str, str] | None = None) -> str:
    """Run ``simclr ARGS``; raise ``SimclrError`` naming the step if it fails."""
    show_command(args, env)
    full_env = {**os.environ, **env} if env else None
    r = subprocess.run(simclr_argv(*args), text=True, capture_output=capture, env=full_env)
    if capture:
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
    if r.returncode != 0:
        raise SimclrError(f"'simclr {args[0]}' failed with exit code {r.returncode}")
    return r.stdout if capture else ""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_training_plan(workers: int | None) -> tuple[int, dict[str, str]]:
    """DataLoader workers and torch threads that share the cores instead of fighting over them.

    On a small CPU machine, 2 workers plus 2 torch threads on 2 cores (the defaults) oversubscribe
    it, and PyTorch's spinning OpenMP threads then run several times slower. Give the workers
    their cores and torch the rest (``OMP_NUM_THREADS``), at least one each.
    """
    cores = usable_cores()
    w = workers if workers is not None else (1 if cores <= 4 else min(4, cores // 2))
    return w, {"OMP_NUM_THREADS": str(max(1, cores - w))}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``simclr serve`` as a subprocess on a free loopback port; ``stop()`` sends SIGTERM."""

    def __init__(self, model: Path, log_path: Path, device: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        args = (
            "serve",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            device,
            "--grace-s",
            "10",
            # Nobody balances load across the demo's one server: no need to linger on SIGTERM.
            "--drain-delay-s",
            "0",
        )
        show_command(args)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(simclr_argv(*args), stdout=self._log, stderr=subprocess.STDOUT)
        self.exit_code: int | None = None

    def wait_serving(self, timeout: float) -> None:
        from simclr_embed.client import EmbeddingClient

        end = time.monotonic() + timeout
        with EmbeddingClient(self.target, timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise SimclrError(
                        f"server exited with code {self.proc.returncode}; "
                        f"log: {self.log_path}\n{self.log_tail()}"
                    )
                try:
                    if client.health() == "SERVING":
                        return
                except Exception:  # not listening yet
                    pass
                if time.monotonic() > end:
                    raise SimclrError(
                        f"server not SERVING after {timeout:.0f} s; log: {self.log_path}"
                    )
                time.sleep(0.2)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> int:
        """SIGTERM → the server drains and exits; returns its exit code (killed after 30 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.exit_code = self.proc.returncode
        return self.exit_code


def write_untrained_checkpoint(trained: Path, out: Path) -> Path:
    """The trained run's architecture at step 0: rebuilt with the run's seed, never trained."""
    import torch

    from simclr_embed.training.checkpoint import FORMAT, load_checkpoint
    from simclr_embed.training.model import build_model

    cfg = dict(load_checkpoint(trained)["config"])
    torch.manual_seed(int(cfg.get("seed", 0)))  # the training's own init (it seeds the same way)
    model = build_model(cfg)
    cfg["max_steps"] = 0
    from simclr_embed.fileio import atomic_path

    with atomic_path(out) as tmp:
        torch.save(
            {"format": FORMAT, "model": model.state_dict(), "config": cfg, "step": 0, "epoch": 0},
            tmp,
        )
    return out


def knn_agreement(vectors: np.ndarray, paths: Sequence[str], data: Path, k: int) -> dict | None:
    """Weighted kNN top-1 of labeled embeddings: every 4th image of a class queries the rest.

    Labels are the first folder under ``data`` (the training-time monitor's split rule). Returns
    None when the data is not labeled (fewer than two class folders).
    """
    import torch

    from simclr_embed.training.knn import knn_top1

    labels = [Path(p).resolve().relative_to(data.resolve()).parts for p in paths]
    if any(len(parts) < 2 for parts in labels):
        return None
    names = sorted({parts[0] for parts in labels})
    if len(names) < 2:
        return None
    y = torch.tensor([names.index(parts[0]) for parts in labels])
    seen: dict[int, int] = {}
    query = torch.zeros(len(y), dtype=torch.bool)
    for i, c in enumerate(y.tolist()):
        query[i] = seen.get(c, 0) % 4 == 3
        seen[c] = seen.get(c, 0) + 1
    x = torch.from_numpy(vectors)
    top1 = knn_top1(x[~query], y[~query], x[query], y[query], len(names), k=k)
    return {
        "top1": top1,
        "classes": len(names),
        "queries": int(query.sum()),
        "bank": int((~query).sum()),
        "chance": 1.0 / len(names),
    }


def serve_and_embed(
    name: str, model: Path, data: Path, out: Path, *, device: str, k: int, startup_timeout_s: float
) -> dict:
    """Serve ``model``, embed ``data`` with ``simclr embed``, measure throughput, stop it.

    Writes ``out/embeddings/<name>.npy`` and ``out/logs/serve-<name>.log``.
    """
    import numpy as np

    from simclr_embed.client import EmbeddingClient

    server = Server(model, out / "logs" / f"serve-{name}.log", device)
    out = out / "embeddings" / f"{name}.npy"
    result: dict = {"model": str(model)}
    try:
        server.wait_serving(startup_timeout_s)
        run_simclr(
            "embed", "--target", server.target, "--output", str(out), "--no-progress", str(data)
        )
        vectors = np.load(out)
        paths = (out.parent / (out.name + ".paths.txt")).read_text().splitlines()
        blobs = [Path(p).read_bytes() for p in paths]  # the usable files (unusable are listed)
        with EmbeddingClient(server.target) as client:
            info = client.model_info()
            client.embed(blobs[:64], concurrency=2)  # warm the connection and the batcher
            t0 = time.perf_counter()
            client.embed(blobs, concurrency=4)
            seconds = time.perf_counter() - t0
        result.update(
            embeddings=str(out),
            n=int(vectors.shape[0]),
            dim=int(vectors.shape[1]),
            images_per_s=len(blobs) / seconds,
            providers=info["providers"],
            version=info["model_version"],
            knn=knn_agreement(vectors, paths, data, k),
        )
    finally:
        code = server.stop()
        result["server_exit_code"] = code
        print(f"stopped {name} server (SIGTERM): exit code {code}", flush=True)
    if code != 0:
        raise SimclrError(
            f"{name} server exited with {code}; log: {server.log_path}\n{server.log_tail()}"
        )
    return result
