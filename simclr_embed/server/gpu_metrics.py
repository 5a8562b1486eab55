"""GPU utilisation and memory on ``/metrics``, read through NVML (``nvidia-ml-py``, optional:
``pip install 'simclr-embed[gpu-metrics]'``) when the model runs on CUDA.

Exported per visible device (label ``gpu``, NVML's index): ``simclr_gpu_utilization_ratio``
(busy fraction of the last sample period, 0–1), ``simclr_gpu_memory_used_bytes`` and
``simclr_gpu_memory_total_bytes``. Read at scrape time (a collector, no thread). On a CPU, or
without NVML, nothing is registered and :func:`register` says why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

NAMES = (
    "simclr_gpu_utilization_ratio",
    "simclr_gpu_memory_used_bytes",
    "simclr_gpu_memory_total_bytes",
)


class NvmlCollector:
    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.handles = [
            nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())
        ]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        util = GaugeMetricFamily(NAMES[0], "GPU busy fraction (NVML)", labels=["gpu"])
        used = GaugeMetricFamily(NAMES[1], "GPU memory in use (NVML)", labels=["gpu"])
        total = GaugeMetricFamily(NAMES[2], "GPU memory (NVML)", labels=["gpu"])
        for i, h in enumerate(self.handles):
            try:
                rates = self.nvml.nvmlDeviceGetUtilizationRates(h)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(h)
            except Exception:  # a device gone or NVML busy: skip it this scrape
                continue
            util.add_metric([str(i)], rates.gpu / 100.0)
            used.add_metric([str(i)], float(memory.used))
            total.add_metric([str(i)], float(memory.total))
        yield from (util, used, total)


def register(registry: CollectorRegistry, providers: tuple[str, ...]) -> str | None:
    """Add the NVML collector when the model runs on CUDA; returns why not, or None."""
    if not any("cuda" in p.lower() for p in providers):  # ORT's CUDAExecutionProvider, torch-cuda
        return "the model runs on the CPU"
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed (pip install 'simclr-embed[gpu-metrics]')"
    try:
        pynvml.nvmlInit()
        registry.register(NvmlCollector(pynvml))
    except Exception as exc:  # no driver library, no permission
        return f"NVML unavailable ({type(exc).__name__}: {exc})"
    return None
