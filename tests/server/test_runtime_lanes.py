"""``OnnxRuntime(idle_threads=...)``: a call alone runs on the wide session, concurrent calls on
the narrow one, and both answer what a plain ONNX Runtime session answers."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from simclr_embed.inference.onnx_runtime import OnnxRuntime


def test_lanes_pick_the_session_by_what_else_runs(tiny_onnx: Path) -> None:
    runtime = OnnxRuntime(tiny_onnx, device="cpu", intra_op_threads=1, idle_threads=2)
    assert runtime._alone is not None
    used: list[str] = []
    narrow_started = threading.Event()

    def spy(session: ort.InferenceSession, name: str) -> None:
        real = session.run

        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            used.append(name)
            if name == "narrow":
                narrow_started.set()
            elif len(used) == 1:  # the first call stays in flight until a second one started
                assert narrow_started.wait(10)
            return real(*args, **kwargs)

        session.run = run  # type: ignore[method-assign]

    spy(runtime._alone, "wide")
    spy(runtime.session, "narrow")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    reference = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    expected = reference.run(["features"], {"images": images})[0]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(runtime.encode, images)
        for _ in range(10_000):
            if used:
                break
            threading.Event().wait(0.001)
        second = pool.submit(runtime.encode, images)  # while the first is still running
        outs = [first.result(30), second.result(30)]
    assert used == ["wide", "narrow"]  # alone → wide; while it runs → narrow
    for out in outs:
        np.testing.assert_allclose(out["features"], expected, rtol=1e-5, atol=1e-5)
    runtime.encode(images)
    assert used[-1] == "wide"  # alone again
