"""The assembled server: grpc.aio + servicer + health + reflection + auth + TLS + metrics + drain.

Start-up order: bind the port and answer health NOT_SERVING at once, then load the model and
warm it up in a worker thread, then SERVING.

Shutdown (SIGTERM/SIGINT), drained in the application before gRPC stops (see ``stop``):

    t=0        health NOT_SERVING; every new Embed → UNAVAILABLE "draining" (retryable)
    t≤grace    the Embed calls accepted before t=0 are decoded, batched and answered
    t≥delay    --drain-delay-s has passed: load balancers and health watchers have noticed
    then       gRPC stops (a short settle for the answers to flush), the batcher drains, exit 0

gRPC's own ``stop(grace)`` is only the last step: called while calls are still arriving it
answers CANCELLED to those not yet handed to a handler (grpc/grpc#41785).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable
from typing import NoReturn

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image

from simclr_embed import tracing
from simclr_embed.errors import SimclrError
from simclr_embed.inference.images import Preprocessor
from simclr_embed.inference.runtime import Runtime, check_model_file, open_runtime, usable_cores
from simclr_embed.pb.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from simclr_embed.server.auth import BearerTokenInterceptor
from simclr_embed.server.batcher import DynamicBatcher
from simclr_embed.server.config import ServeConfig
from simclr_embed.server.core import Backend, RequestPath
from simclr_embed.server.fetch import Fetcher
from simclr_embed.server.http_app import HttpContext
from simclr_embed.server.http_server import HttpServer
from simclr_embed.server.metrics import Metrics
from simclr_embed.server.ports import address, touch_atomically, why_not
from simclr_embed.server.servicer import SERVICE_NAME, EmbeddingServicer
from simclr_embed.server.v2_grpc import SERVICE_NAME as V2_SERVICE_NAME
from simclr_embed.server.v2_grpc import InferenceServicer

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICES = ("", SERVICE_NAME, V2_SERVICE_NAME)  # health is kept per service
_SETTLE_S = 0.5  # after the last answer: time for it to leave before gRPC stops
_QUIET_S, _QUIET_MAX_S = 0.05, 1.0  # a quiet moment with no new call, and how long to hope
# A model call this short runs on the event loop: handing it to a thread and back costs ~0.2 ms
# of CPU on a small VM (bench/serve_overhead.py), more than the call; only do-nothing models and
# tiny inputs are this fast, a real ResNet is not.
INLINE_BELOW_S = 0.2e-3


def _full_batch_seconds(runtime: Runtime, batch: int) -> float:
    """Median duration of a full-batch model call (after warm-up)."""
    images = np.zeros((batch, runtime.info.image_size, runtime.info.image_size, 3), np.uint8)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        runtime.encode(images)
        times.append(time.perf_counter() - started)
    return sorted(times)[2]


class EmbeddingServer:
    """One server instance. ``await start()`` returns once SERVING; ``await stop(grace)`` drains.

    Tests run it in-process on port 0 (``self.port`` is the bound one); the CLI uses :func:`serve`.
    """

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.runtime: Runtime | None = None
        self._batcher: DynamicBatcher | None = None
        decode_threads = cfg.decode_threads or usable_cores()
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            decode_threads, thread_name_prefix="simclr-decode"
        )
        # The transport-neutral request path; every transport is an adapter over it.
        self.path = RequestPath(
            metrics=self.metrics,
            decode_pool=self._decode_pool,
            max_request_images=cfg.max_request_images,
            decode_workers=decode_threads,
        )
        self._servicer = EmbeddingServicer(self.path, self.metrics)
        self._v2 = InferenceServicer(self.path, self.metrics, cfg.model_name)
        self.http: HttpServer | None = None
        self.http_port: int | None = None
        if cfg.http_port is not None:
            fetcher = Fetcher(
                cfg.fetch_hosts, int(cfg.fetch_max_mb * 1024 * 1024), cfg.fetch_timeout_s
            )
            self.http = HttpServer(HttpContext(cfg, self.path, self.metrics, fetcher))
        self._health = health.aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self._hurry = asyncio.Event()  # a second signal: stop waiting for the drain

    @property
    def max_inflight(self) -> int:
        """Model calls at once: 2 by default, so one batch is prepared/copied while one runs."""
        return self.cfg.max_inflight or 2

    async def start(self) -> None:
        cfg = self.cfg
        check_model_file(cfg.model)  # before the port opens: a checkpoint is not a model
        tracing.setup(
            cfg.service_name, cfg.otlp_endpoint, cfg.otlp_protocol, cfg.trace_sample_ratio
        )
        interceptors = []
        if cfg.auth_token:
            interceptors.append(BearerTokenInterceptor(cfg.auth_token, self._count_rejected))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                # Without this a second server on the same port would silently share it; the
                # workers of one --processes group share it on purpose (simclr_embed.server.group).
                ("grpc.so_reuseport", 1 if cfg.worker else 0),
            ],
        )
        pb_grpc.add_EmbeddingServiceServicer_to_server(self._servicer, server)
        v2_grpc.add_GRPCInferenceServiceServicer_to_server(self._v2, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, V2_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        for service in _SERVICES:  # "" = the whole server
            await self._health.set(service, _NOT_SERVING)
        self.port = self._bind(server)
        self.grpc_server = server
        await server.start()
        if self.http is not None:  # bound before the model loads: probes see 503 meanwhile
            self.http_port = await self.http.start()
        if cfg.metrics_port is not None and cfg.worker is None:  # a group's supervisor serves it
            try:
                self.metrics_port = self.metrics.serve(cfg.host, cfg.metrics_port)
            except OSError as exc:
                raise SimclrError(
                    f"cannot serve metrics on port {cfg.metrics_port}: {exc}"
                ) from None
        log.info(
            "listening on %s (%s), loading %s",
            address(cfg.host, self.port),
            "TLS" if cfg.tls_cert else "plaintext",
            cfg.model,
        )

        # Pillow's own bomb check must not be stricter than --max-pixels (ours runs first).
        if cfg.max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
            Image.MAX_IMAGE_PIXELS = cfg.max_pixels
        loop = asyncio.get_running_loop()
        self.runtime = runtime = await loop.run_in_executor(None, self._load_model)
        call_s = await loop.run_in_executor(None, _full_batch_seconds, runtime, cfg.max_batch_size)
        inline = cfg.model_calls == "loop" or (
            cfg.model_calls == "auto" and call_s < INLINE_BELOW_S
        )
        log.info(
            "a full batch (%d) takes %.2f ms: model calls run %s",
            cfg.max_batch_size,
            1e3 * call_s,
            "on the event loop" if inline else "in their own threads",
        )
        inflight = self.max_inflight
        self._batcher = DynamicBatcher(
            runtime.encode,
            max_batch_size=cfg.max_batch_size,
            max_delay_s=cfg.max_delay_ms / 1e3,
            max_queue=cfg.max_queue,
            max_inflight=inflight,
            observer=self.metrics,
            policy=cfg.batching,
            inline=inline,
        )
        self._batcher.start()
        preprocessor = Preprocessor(runtime.info.image_size, runtime.info.resize, cfg.max_pixels)
        self.path.attach(
            Backend(runtime.info, tuple(runtime.providers), preprocessor, self._batcher)
        )
        for service in _SERVICES:
            await self._health.set(service, _SERVING)
        self.metrics.serving(cfg.max_queue, tuple(runtime.providers))
        if cfg.ready_file is not None:
            touch_atomically(cfg.ready_file)
        log.info(
            "%s on %s: model %s, providers %s, max batch %d, max delay %.1f ms, "
            "%d batch(es) in flight",
            # One "SERVING on" line per port: a group's supervisor says it once all are ready.
            "SERVING"
            if cfg.worker is None
            else f"ready (worker {cfg.worker[0]}/{cfg.worker[1]}, pid {os.getpid()})",
            address(cfg.host, self.port),
            runtime.info.model_version,
            runtime.providers,
            cfg.max_batch_size,
            cfg.max_delay_ms,
            inflight,
        )

    def _load_model(self) -> Runtime:
        runtime = open_runtime(
            self.cfg.model,
            device=self.cfg.device,
            max_batch_size=self.cfg.max_batch_size,
            # CPU: the in-flight batches split the cores between them rather than oversubscribe
            # them (2 × 1 thread vs 1 × 2 threads on 2 cores: even to 1.35x; docs/benchmarks.md).
            intra_op_threads=self.cfg.intra_op_threads
            or max(1, usable_cores() // self.max_inflight),
            tensorrt=self.cfg.tensorrt,
            precision=self.cfg.precision,
            # ... but a call that runs alone gets every core (unless the user set the threads).
            idle_threads=0 if self.cfg.intra_op_threads else usable_cores(),
        )
        runtime.warm_up()
        return runtime

    def _bind(self, server: grpc.aio.Server) -> int:
        cfg = self.cfg
        where = address(cfg.host, cfg.port)
        try:
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                creds = grpc.ssl_server_credentials(
                    [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())]
                )
                port = server.add_secure_port(where, creds)
            else:
                port = server.add_insecure_port(where)
        except OSError as exc:
            raise SimclrError(f"cannot read TLS files: {exc}") from None
        except RuntimeError as exc:
            raise SimclrError(
                f"cannot listen on {where}: {why_not(cfg.host, cfg.port, exc)}"
            ) from None
        if not port:
            raise SimclrError(f"cannot listen on {where}: {why_not(cfg.host, cfg.port, None)}")
        return port

    def _count_rejected(self, method: str) -> None:
        if method.endswith(("/Embed", "/EmbedStream")):
            self.metrics.request_done("UNAUTHENTICATED", 0)
        elif method.endswith("/ModelInfer"):
            self.metrics.request_done("UNAUTHENTICATED", 0, "v2-grpc")

    @property
    def hurried(self) -> bool:
        return self._hurry.is_set()

    def hurry(self) -> None:
        """Cut a drain in progress short: stop gRPC now, cancelling what still runs."""
        self._hurry.set()

    async def _wait_or_hurry(self, aw: Awaitable[object], timeout: float) -> None:
        """Wait for ``aw`` at most ``timeout`` seconds, or until :meth:`hurry` is called."""
        job = asyncio.ensure_future(aw)
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait(
                (job, hurry), timeout=max(0.0, timeout), return_when="FIRST_COMPLETED"
            )
        finally:
            for task in (job, hurry):
                task.cancel()

    async def drain(self, grace: float | None = None, drain_delay: float | None = None) -> None:
        """Refuse new calls, answer the accepted ones, linger (the module docstring's timeline).

        Args:
            grace: most seconds the calls accepted before the drain get to finish.
            drain_delay: least seconds between the drain's start and its end, during which new
                calls are answered UNAVAILABLE and health says NOT_SERVING.
        """
        grace = self.cfg.grace_s if grace is None else grace
        delay = self.cfg.drain_delay_s if drain_delay is None else drain_delay
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.path.drain()  # before the health flip: nothing new is accepted once it shows
        self.metrics.ready.set(0)  # draining
        await self._health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        if self.path.inflight:
            log.info("draining %d request(s) in flight", self.path.inflight)
        await self._wait_or_hurry(self.path.wait_idle(None), grace)
        if self.path.inflight and not self._hurry.is_set():
            log.warning("grace of %.1f s over: cancelling %d request(s)", grace, self.path.inflight)
        await self._wait_or_hurry(self._hurry.wait(), started + delay - loop.time())
        # Clients that follow health or back off from UNAVAILABLE have gone by now; wait
        # (briefly) for a quiet moment, so that nothing is in transit when the port closes.
        quiet_until = loop.time() + _QUIET_MAX_S
        while not self._hurry.is_set() and loop.time() < quiet_until:
            since = loop.time() - self.path.last_call
            if since >= _QUIET_S:
                break
            await asyncio.sleep(_QUIET_S - since)

    async def stop(self, grace: float | None = None, drain_delay: float | None = None) -> None:
        """:meth:`drain`, then stop gRPC and release everything; safe to call twice.

        gRPC's stop answers CANCELLED to calls that reach the port in its last instant; the
        ``simclr serve`` process avoids even that by exiting instead (:func:`serve`).
        """
        await self.drain(grace, drain_delay)
        if self.grpc_server is not None:
            # Only health watchers (long-lived streams) and answers being flushed are left:
            # a short settle, then gRPC cancels whatever still runs.
            settle = 0.0 if self._hurry.is_set() or self.path.inflight else _SETTLE_S
            await self.grpc_server.stop(settle)
        await self.release()

    async def release(self) -> None:
        """Stop the batcher, pools and metrics endpoint; log the final answer counts."""
        if self.http is not None:
            await self.http.close()
        if self._batcher is not None:
            await self._batcher.stop(timeout=1.0)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()
        if self.cfg.otlp_endpoint is not None:
            await asyncio.to_thread(tracing.shutdown)  # flush the last spans to the collector
        counts = self.metrics.request_counts()
        log.info(
            "stopped; Embed calls answered: %s",
            " ".join(f"{code}={n}" for code, n in sorted(counts.items()) if n) or "none",
        )


async def serve(cfg: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain; a second signal cuts the drain short. Returns 0."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    server = EmbeddingServer(cfg)

    def on_signal(sig: signal.Signals) -> None:
        if not stop_requested.is_set():
            log.info(
                "%s: draining (grace %.1f s, drain delay %.1f s; signal again to stop now)",
                sig.name,
                cfg.grace_s,
                cfg.drain_delay_s,
            )
            stop_requested.set()
        else:
            log.warning("%s again: cancelling in-flight requests", sig.name)
            server.hurry()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    watchdog = None
    if cfg.worker is not None:  # a group's worker drains by itself if its supervisor dies
        watchdog = asyncio.ensure_future(_watch_parent(os.getppid(), stop_requested))
    try:
        await server.start()
    except BaseException:
        await server.stop(0, drain_delay=0)
        raise
    await stop_requested.wait()
    if watchdog is not None:
        watchdog.cancel()
    await server.drain()
    # Every accepted call is answered. gRPC's own stop would now answer CANCELLED to any call
    # still arriving (grpc/grpc#41785); ending the process closes the connections instead, which
    # clients see as UNAVAILABLE — retryable, and true: this server is gone.
    await asyncio.sleep(0.0 if server.hurried else _SETTLE_S)  # the last answers leave
    await server.release()
    _exit_now(0)
    return 0  # not reached


async def _watch_parent(parent: int, stop_requested: asyncio.Event) -> None:
    """Drain when the supervisor that started this worker is gone (SIGKILL, OOM): workers run
    in their own session, so nothing else would tell them."""
    while not stop_requested.is_set():
        await asyncio.sleep(0.5)
        if os.getppid() != parent:
            log.warning("supervisor %d is gone: draining", parent)
            stop_requested.set()


def _exit_now(code: int) -> NoReturn:
    """End the process at once (no interpreter teardown that could touch gRPC's calls)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
