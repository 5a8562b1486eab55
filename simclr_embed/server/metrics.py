"""Prometheus metrics of CONTRACT §6, in the server's own registry, served on ``--metrics-port``
(and at ``/metrics`` on the ``--http-port``).

Names: ``simclr_requests_total{code,protocol}`` (``code``: the gRPC status name whatever the
protocol, so one PromQL covers them all), ``simclr_images_total``, ``simclr_batch_size``,
``simclr_queue_seconds``, ``simclr_inference_seconds``, ``simclr_decode_seconds`` (histograms),
``simclr_queue_images`` (gauge). For dashboards and alerts (deploy/grafana, deploy/prometheus):
``simclr_ready`` (1 while SERVING), ``simclr_queue_capacity_images`` (``--max-queue``), the
process's ``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ``process_open_fds``
(prometheus-client's process collector), and with NVML on a GPU ``simclr_gpu_*``
(:mod:`simclr_embed.server.gpu_metrics`). An own registry (not the global default) keeps several
servers in one process (tests) apart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from simclr_embed.server import gpu_metrics

log = logging.getLogger(__name__)

# Codes the server answers with; created at zero so dashboards see them before the first error.
KNOWN_CODES = (
    "OK",
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
    "UNAUTHENTICATED",
    "CANCELLED",
    "INTERNAL",
)
# The request paths; created at zero too.
PROTOCOLS = ("grpc", "v2-grpc", "http-openai", "v2-http")
_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The server's metrics; also the batcher's ``BatchObserver``. Thread-safe (decode threads)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        own = registry is None
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        if own:  # a group's supervisor (multiprocess mode) adds its own, per process
            ProcessCollector(
                registry=r
            )  # process_cpu_seconds_total, _resident_memory_bytes, _open_fds
        self.ready = Gauge(
            "simclr_ready",
            "1 while the server answers (health SERVING), 0 while it starts or drains",
            registry=r,
            multiprocess_mode="livemin",  # a group is ready when every process is
        )
        self.queue_capacity = Gauge(
            "simclr_queue_capacity_images",
            "Images the queue holds before RESOURCE_EXHAUSTED (--max-queue)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.requests = Counter(
            "simclr_requests_total",
            "Embedding requests answered, by gRPC status code (HTTP answers by their gRPC "
            "equivalent) and protocol",
            ["code", "protocol"],
            registry=r,
        )
        # The labelled children, looked up once (labels() takes a lock and builds a key).
        self._by_code = {
            (code, protocol): self.requests.labels(code=code, protocol=protocol)
            for code in KNOWN_CODES
            for protocol in PROTOCOLS
        }
        self.images = Counter("simclr_images_total", "Images embedded (answered OK)", registry=r)
        self.batch_size = Histogram(
            "simclr_batch_size", "Images per model call", buckets=_BATCH, registry=r
        )
        self.queue_seconds = Histogram(
            "simclr_queue_seconds",
            "Time a request's images waited in the batcher before their model call",
            buckets=_SECONDS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "simclr_inference_seconds", "Duration of one model call", buckets=_SECONDS, registry=r
        )
        self.decode_seconds = Histogram(
            "simclr_decode_seconds",
            "Decode + resize time of one image",
            buckets=_SECONDS,
            registry=r,
        )
        self.queue_images = Gauge(
            "simclr_queue_images",
            "Images waiting for a model batch",
            registry=r,
            # --processes N (prometheus-client multiprocess mode): the group's queue is the sum
            # over its live workers. Ignored in a single process.
            multiprocess_mode="livesum",
        )
        self._http = None

    def serving(self, max_queue: int, providers: tuple[str, ...]) -> None:
        """The server is SERVING: readiness, capacity, and the GPU gauges when on CUDA."""
        self.ready.set(1)
        self.queue_capacity.set(max_queue)
        why_not = gpu_metrics.register(self.registry, providers)
        if why_not is not None:
            log.debug("no GPU metrics: %s", why_not)

    # -- BatchObserver ---------------------------------------------------------------------------

    def queue_changed(self, images: int) -> None:
        self.queue_images.set(images)

    def batch_done(
        self, size: int, queue_seconds: Sequence[float], inference_seconds: float
    ) -> None:
        self.batch_size.observe(size)
        for seconds in queue_seconds:
            self.queue_seconds.observe(seconds)
        self.inference_seconds.observe(inference_seconds)

    # -- servicer --------------------------------------------------------------------------------

    def request_done(self, code: str, images: int, protocol: str = "grpc") -> None:
        child = self._by_code.get((code, protocol))
        (child or self.requests.labels(code=code, protocol=protocol)).inc()
        if code == "OK":
            self.images.inc(images)

    def request_counts(self) -> dict[str, int]:
        """``{code: requests answered}`` so far over every protocol (``simclr_requests_total``)."""
        counts: dict[str, int] = {}
        for sample in self.requests.collect()[0].samples:
            if sample.name == "simclr_requests_total":
                code = sample.labels["code"]
                counts[code] = counts.get(code, 0) + int(sample.value)
        return counts

    # -- exposition ------------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        bound = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
