"""An in-process server on 127.0.0.1 port 0 (its own event loop in a thread) and image helpers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from simclr_embed.server.app import EmbeddingServer
from simclr_embed.server.config import ServeConfig


class ServerThread:
    """A real EmbeddingServer on its own event loop, for tests that use blocking channels."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> EmbeddingServer:
            return EmbeddingServer(cfg)  # asyncio objects are made on the server's loop

        self.server = self.call(make())
        try:
            self.call(self.server.start(), timeout=120)
        except BaseException:
            self.close()
            raise

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def close(self) -> None:
        if self.loop.is_running():
            self.call(self.server.stop(1.0))  # a second stop() is harmless
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()


REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """``python -m simclr_embed.server ARGS`` as a real process; its stderr is collected in ``lines``."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simclr_embed.server", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        self._reader = threading.Thread(
            target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")),  # type: ignore[union-attr]
            daemon=True,
        )
        self._reader.start()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_serving(self, timeout: float = 120) -> int:
        """Block until the log says SERVING; returns the gRPC port."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = re.search(r"SERVING on 127\.0\.0\.1:(\d+)", self.log)
            if found:
                return int(found.group(1))
            assert self.proc.poll() is None, self.log
            time.sleep(0.05)
        raise AssertionError(f"not SERVING after {timeout} s:\n{self.log}")

    def metrics_port(self) -> int:
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)", self.log)
        assert found, self.log
        return int(found.group(1))

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)


def serve_config(model: Path, **overrides: Any) -> ServeConfig:
    base = ServeConfig(
        model=model, port=0, device="cpu", max_delay_ms=5.0, grace_s=5.0, drain_delay_s=0.0
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="module")
def server(tiny_onnx: Path) -> Iterator[ServerThread]:
    """The default server (no auth, no TLS) over the tiny model, shared by a test module."""
    running = ServerThread(serve_config(tiny_onnx, metrics_port=0))
    yield running
    running.close()


@pytest.fixture(scope="session")
def reference_session(tiny_onnx: Path) -> ort.InferenceSession:
    """A plain ONNX Runtime session: the independent reference for what the server answers."""
    return ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])


def reference(session: ort.InferenceSession, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Model outputs for uint8 ``[N, S, S, 3]``, one image at a time."""
    outs = [
        session.run(["features", "projection"], {"images": batch[i : i + 1]})
        for i in range(len(batch))
    ]
    return {
        "features": np.concatenate([o[0] for o in outs]),
        "projection": np.concatenate([o[1] for o in outs]),
    }


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB picture (gradients + blobs): compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    chans = []
    for _ in range(3):
        fx, fy = rng.uniform(0.5, 4, 2)
        phase = rng.uniform(0, 6.28)
        chans.append(127 + 120 * np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase))
    return Image.fromarray(np.clip(np.stack(chans, axis=2), 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **save_args: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_args)
    return buf.getvalue()
