"""``simclr serve`` configuration: one frozen dataclass, built from argparse (CONTRACT §2)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from simclr_embed.inference.images import DEFAULT_MAX_PIXELS

TOKEN_ENV = "SIMCLR_AUTH_TOKEN"
# Kubernetes removes a terminating pod from its Services while it sends SIGTERM; kube-proxy,
# DNS caches and clients' health watches take a few seconds to follow. Answering UNAVAILABLE
# (and NOT_SERVING) for this long before the port closes gives them that time.
DEFAULT_DRAIN_DELAY_S = 5.0


@dataclass(frozen=True)
class ServeConfig:
    model: Path
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    max_batch_size: int = 32
    max_delay_ms: float = 2.0
    batching: str = "continuous"  # continuous | delay (simclr_embed.server.batcher)
    max_queue: int = 1024
    max_request_images: int = 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_inflight: int = 0  # 0: 2
    decode_threads: int = 0  # 0: usable cores
    intra_op_threads: int = 0  # 0: usable cores / max_inflight
    tensorrt: bool = False
    precision: str = "auto"  # torch runtime (.pt2) only
    model_calls: str = "auto"  # auto | threads | loop (simclr_embed.server.batcher "inline")
    metrics_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_token: str | None = field(default=None, repr=False)  # never logged
    grace_s: float = 30.0
    drain_delay_s: float = DEFAULT_DRAIN_DELAY_S
    max_message_mb: int = 64
    log_level: str = "info"
    log_format: str = "text"  # text | json (simclr_embed.logs)
    otlp_endpoint: str | None = None  # tracing off unless set (simclr_embed.tracing)
    otlp_protocol: str = "grpc"
    trace_sample_ratio: float = 1.0
    service_name: str = "simclr-serve"
    processes: int = 1  # >1: simclr_embed.server.group runs that many workers on the port
    worker: tuple[int, int] | None = (
        None  # (i, N): one worker of a group (simclr_embed.server.group)
    )
    ready_file: Path | None = None
    http_port: int | None = None  # None: no HTTP (OpenAI-style + Open Inference Protocol)
    model_name: str = "simclr"  # the name in HTTP and V2 paths
    fetch_hosts: tuple[str, ...] = ()  # hosts whose https:// image URLs may be fetched
    fetch_max_mb: float = 20.0
    fetch_timeout_s: float = 10.0

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simclr serve",
        description="Serve an exported SimCLR ONNX model over gRPC with dynamic batching.",
    )
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        help="the .onnx file from export-onnx (ONNX Runtime), or its --torch-program .pt2 "
        "(torch runtime; needs torch)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind [127.0.0.1]")
    p.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one [50051]")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when it really loads, else CPU; cuda: fail if it does not [auto]",
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="most images per model call [32]")
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=2.0,
        help="longest wait of the oldest queued image for batch-mates [2]",
    )
    p.add_argument(
        "--batching",
        choices=("continuous", "delay"),
        default="continuous",
        help="continuous: an idle model takes what is queued at once, the delay bounds only the "
        "wait beside a busy model; delay: every partial batch waits --max-delay-ms (Triton's "
        "rule) [continuous]",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="most images waiting for a batch; a request that does not fit gets "
        "RESOURCE_EXHAUSTED [1024]",
    )
    p.add_argument(
        "--max-request-images",
        type=int,
        default=1024,
        help="most images in one Embed request [1024]",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="most pixels per image, checked before decoding [50000000]",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=0,
        help="model calls running at once; 0 = 2 [0]",
    )
    p.add_argument(
        "--decode-threads", type=int, default=0, help="image decode threads; 0 = cores [0]"
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="ONNX Runtime CPU threads per model call; 0 = cores / max-inflight [0]",
    )
    p.add_argument(
        "--model-calls",
        choices=("auto", "threads", "loop"),
        default="auto",
        help="where model calls run: threads (the loop stays free while the model runs), loop "
        "(no thread hop, for models far faster than one); auto: loop when a full batch takes "
        "under 0.2 ms at start-up (do-nothing and toy models only), else threads [auto]",
    )
    p.add_argument("--tensorrt", action="store_true", help="try the TensorRT provider first (GPU)")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help=".pt2 models: autocast dtype; auto = bf16 on a GPU (fp16 without bf16), fp32 on "
        "CPU (an .onnx model runs in the precision it was exported in) [auto]",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics on this port (same host) [off]",
    )
    p.add_argument(
        "--tls-cert", type=Path, default=None, help="PEM certificate chain (enables TLS)"
    )
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert")
    p.add_argument(
        "--auth-token",
        default=None,
        help=f"require 'authorization: Bearer <token>' on every RPC but health [env {TOKEN_ENV}]",
    )
    p.add_argument(
        "--grace-s",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, seconds in-flight requests get to finish [30]",
    )
    p.add_argument(
        "--drain-delay-s",
        type=float,
        default=DEFAULT_DRAIN_DELAY_S,
        help="on SIGTERM/SIGINT, least seconds between the drain's start and closing the port; "
        "meanwhile new calls get UNAVAILABLE and health says NOT_SERVING, so load balancers "
        f"and clients move away first (runs alongside --grace-s) [{DEFAULT_DRAIN_DELAY_S:g}]",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT), each with its own batcher and "
        "model session; one Python process tops out at a few thousand small requests/s, below "
        "what a GPU embeds (docs/serving.md) [1]",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        help="create this file once SERVING (all processes warm), for scripts and probes [off]",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="also serve HTTP on this port (same --host, same TLS and token): OpenAI-style "
        "/v1/embeddings, the Open Inference Protocol (KServe V2) /v2/..., /metrics; 0 picks a "
        "free one [off]",
    )
    p.add_argument(
        "--model-name",
        default="simclr",
        help="the model's name in HTTP paths, OpenAI 'model' and V2 calls [simclr]",
    )
    p.add_argument(
        "--fetch-hosts",
        nargs="+",
        default=(),
        metavar="HOST",
        help="allow https:// image URLs on these hosts (exact names or IP addresses); off by "
        "default: a server that fetches any URL is an SSRF hole. Private and loopback "
        "addresses are refused unless listed as an IP address [none]",
    )
    p.add_argument("--fetch-max-mb", type=float, default=20.0, help="largest fetched image [20]")
    p.add_argument(
        "--fetch-timeout-s", type=float, default=10.0, help="longest fetch of one image [10]"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "i/N", set by the group
    p.add_argument("--max-message-mb", type=int, default=64, help="largest gRPC message [64]")
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="debug logs per-request timing [info]",
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="json: one object per line [text]")  # fmt: skip
    p.add_argument("--otlp-endpoint", default=None, metavar="HOST:PORT|URL", help="export OpenTelemetry traces to this OTLP collector (needs the tracing extra) [off]")  # fmt: skip
    p.add_argument("--otlp-protocol", choices=("grpc", "http"), default="grpc", help="OTLP over gRPC (4317) or HTTP/protobuf (4318) [grpc]")  # fmt: skip
    p.add_argument("--trace-sample-ratio", type=float, default=1.0, help="share of new traces kept; a caller's sampled flag is always followed [1.0]")  # fmt: skip
    p.add_argument("--service-name", default="simclr-serve", help="service.name on the traces [simclr-serve]")  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServeConfig:
    """Validate flags (``parser.error`` → exit 2 naming the flag) and freeze them."""
    positive = ("max_batch_size", "max_queue", "max_request_images", "max_pixels", "max_message_mb")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_inflight", "decode_threads", "intra_op_threads"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("max_delay_ms", "grace_s", "drain_delay_s"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.trace_sample_ratio <= 1.0:
        parser.error(f"--trace-sample-ratio must be in [0, 1], got {args.trace_sample_ratio}")
    for name in ("fetch_max_mb", "fetch_timeout_s"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not args.model_name or "/" in args.model_name or any(c.isspace() for c in args.model_name):
        parser.error("--model-name must be a non-empty name without '/' or spaces")
    for name in ("port", "metrics_port", "http_port"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 65535:
            parser.error(f"--{name.replace('_', '-')} must be in 0..65535, got {value}")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    worker = None
    if args.worker is not None:
        i, _, n = args.worker.partition("/")
        if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
            parser.error(f"--worker must be i/N with i < N, got {args.worker!r}")
        worker = (int(i), int(n))
    token = args.auth_token if args.auth_token is not None else os.environ.get(TOKEN_ENV)
    if token is not None and (not token or any(c.isspace() for c in token)):
        parser.error("--auth-token must be non-empty and without whitespace")
    return ServeConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        batching=args.batching,
        max_queue=args.max_queue,
        max_request_images=args.max_request_images,
        max_pixels=args.max_pixels,
        max_inflight=args.max_inflight,
        decode_threads=args.decode_threads,
        intra_op_threads=args.intra_op_threads,
        tensorrt=args.tensorrt,
        precision=args.precision,
        model_calls=args.model_calls,
        metrics_port=args.metrics_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_token=token or None,
        grace_s=args.grace_s,
        drain_delay_s=args.drain_delay_s,
        max_message_mb=args.max_message_mb,
        log_level=args.log_level,
        log_format=args.log_format,
        otlp_endpoint=args.otlp_endpoint,
        otlp_protocol=args.otlp_protocol,
        trace_sample_ratio=args.trace_sample_ratio,
        service_name=args.service_name,
        processes=1 if worker else args.processes,
        worker=worker,
        ready_file=args.ready_file,
        http_port=args.http_port,
        model_name=args.model_name,
        fetch_hosts=tuple(host.lower() for host in args.fetch_hosts),
        fetch_max_mb=args.fetch_max_mb,
        fetch_timeout_s=args.fetch_timeout_s,
    )
