"""ONNX Runtime backend (``.onnx``): ``encode(uint8 [N, S, S, 3]) -> {"features": [N, F], "projection": [N, P]}``.

Device choice: ``cpu``; ``cuda`` (must really load, else :class:`SimclrError` with the reason);
``auto`` (CUDA when it really loads, else CPU). With onnxruntime-gpu, ``get_available_providers()``
lists CUDA even on a machine without a GPU, so the only trustworthy answer is
``session.get_providers()`` after creating the session.

CPU: intra-op threads = the cores this process may use, no spinning (the decode threads need
those cores between batches). A server running several batches at once splits the cores between
them (``intra_op_threads``); with ``idle_threads`` a second session on more threads takes the
calls that start while no other call runs, so one request alone is not held to a share of the
cores (bench/peers.py: p50 at one client 23 → 15 ms for resnet18 @ 64 px on 2 cores). CUDA: inputs/outputs through IO binding, batches padded up to a few
bucket sizes so cuDNN autotunes a bounded set of shapes, all of them during warm-up; TensorRT
first when asked for and present. This module never imports torch.
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from simclr_embed.errors import SimclrError
from simclr_embed.inference.model_info import (
    INPUT,
    OUTPUTS,
    ModelInfo,
    bucket_sizes,
    model_info_from_metadata,
    pad_to_bucket,
    usable_cores,
)

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


def _cuda_driver_problem() -> str | None:
    """Why CUDA cannot work here, when the reason is simply "no NVIDIA driver"."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"no NVIDIA driver ({exc})"
    return None


class OnnxRuntime:
    """One ONNX Runtime session over an exported SimCLR model; ``encode`` is thread-safe.

    Args:
        path: the ``.onnx`` file written by ``simclr export-onnx``.
        device: ``auto``, ``cpu`` or ``cuda``.
        max_batch_size: largest batch ``encode`` will get (sets the CUDA buckets and warm-up).
        intra_op_threads: CPU threads per ``session.run`` (0 = usable cores).
        tensorrt: put the TensorRT provider first when it loads (CUDA only).
        idle_threads: CPU only, when more than ``intra_op_threads``: a second session with this
            many threads for the calls that start while no other call is running.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        max_batch_size: int = 32,
        intra_op_threads: int = 0,
        tensorrt: bool = False,
        idle_threads: int = 0,
    ) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise SimclrError(f"model file not found: {self.path}")
        self.max_batch_size = max_batch_size
        self._threads = intra_op_threads or usable_cores()
        self.session = self._open(device, tensorrt)
        self.providers: list[str] = list(self.session.get_providers())
        self.on_gpu = CUDA in self.providers or TRT in self.providers
        self.info = read_model_info(self.session, self.path)
        self.buckets = bucket_sizes(max_batch_size) if self.on_gpu else None
        self._lane_lock = threading.Lock()
        self._running = 0  # encode calls in progress
        self._alone: ort.InferenceSession | None = None  # the idle_threads session
        if not self.on_gpu and idle_threads > self._threads:
            narrow, self._threads = self._threads, idle_threads
            self._alone = self._create([CPU])
            self._threads = narrow
        log.info(
            "model %s (%s, %d px, version %s) on providers %s",
            self.path,
            self.info.arch,
            self.info.image_size,
            self.info.model_version,
            self.providers,
        )

    # -- session ---------------------------------------------------------------------------------

    def _options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self._threads
        opts.inter_op_num_threads = 1
        # Spinning workers would take the cores that decode requests between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def _create(self, providers: list) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(self.path), self._options(), providers=providers)
        except Exception as exc:  # InvalidProtobuf, InvalidGraph, Fail, ...: a bad model file
            raise SimclrError(f"cannot load model {self.path}: {exc}") from None

    def _open(self, device: str, tensorrt: bool) -> ort.InferenceSession:
        if device == "cpu":
            return self._create([CPU])
        problem = _cuda_driver_problem()
        if problem is None and CUDA not in ort.get_available_providers():
            problem = f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
        if problem is None:
            # onnxruntime-gpu finds the CUDA/cuDNN libraries of the nvidia-* wheels this way.
            if hasattr(ort, "preload_dlls"):
                try:
                    ort.preload_dlls()
                except Exception as exc:  # best effort: system libraries may still work
                    log.debug("onnxruntime.preload_dlls failed: %s", exc)
            cuda_opts = {"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"}
            providers: list = [(CUDA, cuda_opts), CPU]
            if tensorrt and TRT in ort.get_available_providers():
                providers.insert(
                    0,
                    (
                        TRT,
                        {
                            "device_id": 0,
                            "trt_engine_cache_enable": True,
                            # The model folder may be read-only (a mounted volume).
                            "trt_engine_cache_path": str(
                                Path(tempfile.gettempdir()) / "simclr-trt"
                            ),
                        },
                    ),
                )
            session = self._create(providers)
            if CUDA in session.get_providers():
                return session
            problem = "ONNX Runtime could not load its CUDA provider (see its log above; it needs CUDA and cuDNN libraries matching the onnxruntime-gpu build)"
        if device == "cuda":
            raise SimclrError(f"--device cuda: {problem}")
        log.info("CUDA not used (%s); running on CPU", problem)
        return self._create([CPU])

    # -- inference -------------------------------------------------------------------------------

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 ``[N, S, S, 3]`` → float32 ``{"features": [N, F], "projection": [N, P]}``."""
        if not self.on_gpu:
            session = self.session
            if self._alone is not None:
                with self._lane_lock:
                    alone = self._running == 0
                    self._running += 1
                session = self._alone if alone else self.session
            try:
                outs = session.run(list(OUTPUTS), {INPUT: images})
            finally:
                if self._alone is not None:
                    with self._lane_lock:
                        self._running -= 1
            return dict(zip(OUTPUTS, outs, strict=True))
        n = len(images)
        assert self.buckets is not None
        padded = pad_to_bucket(images, self.buckets)  # [bucket, S, S, 3]
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT, padded)
        for name in OUTPUTS:  # outputs stay on the GPU until one copy at the end
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        outs = binding.copy_outputs_to_cpu()
        return {name: out[:n] for name, out in zip(OUTPUTS, outs, strict=True)}

    def warm_up(self) -> None:
        """Run every batch shape the server will use once (arena growth, cuDNN autotuning)."""
        s = self.info.image_size
        sizes = self.buckets or sorted({1, self.max_batch_size})
        for b in sizes:
            self.encode(np.zeros((b, s, s, 3), np.uint8))  # the idle_threads session, if any
            if self._alone is not None:
                self.session.run(list(OUTPUTS), {INPUT: np.zeros((b, s, s, 3), np.uint8)})
        log.info("warmed up batch sizes %s", list(sizes))


def read_model_info(session: ort.InferenceSession, path: Path) -> ModelInfo:
    """Model facts from ``simclr.*`` metadata, falling back to the graph's static shapes."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if (
        INPUT not in inputs
        or inputs[INPUT].type != "tensor(uint8)"
        or len(inputs[INPUT].shape) != 4
    ):
        raise SimclrError(
            f"{path}: expected a uint8 input 'images' [N, S, S, 3] (an export-onnx model)"
        )
    missing = [name for name in OUTPUTS if name not in outputs]
    if missing:
        raise SimclrError(f"{path}: model has no output(s) {missing}")
    side = inputs[INPUT].shape[1]
    info = model_info_from_metadata(
        session.get_modelmeta().custom_metadata_map,
        path,
        image_size=side,
        feature_dim=outputs["features"].shape[1],
        projection_dim=outputs["projection"].shape[1],
    )
    if isinstance(side, int) and side != info.image_size:
        raise SimclrError(f"{path}: metadata says {info.image_size} px, the graph takes {side}")
    return info
