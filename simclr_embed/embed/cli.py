"""``simclr embed``: every image under some paths → vectors on disk; bad files skipped and listed.

    simclr embed --target 127.0.0.1:50051 --output out.npy photos/ extra.jpg   # through a server
    simclr embed --model model.onnx --output out.npy photos/                     # in this process
    simclr embed --ray --model model.onnx --format parquet --output emb/ photos/ # on Ray Data

``--format npy`` (default for an .npy OUTPUT): ``out.npy`` float32 ``[N, D]`` (row i = line i of
``out.npy.paths.txt``) and ``out.npy.json`` (model version, kind, counts). ``--format parquet``:
OUTPUT is a folder of Parquet parts (``path``, ``embedding``). Unusable files are left out and
listed in ``OUTPUT.errors.tsv`` (``--on-error skip``, the default) or stop the run
(``--on-error fail``). Vectors are written as the run goes; after a crash or a kill the same
command with ``--resume`` embeds only what is missing and ends with the same output.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simclr_embed.client.health import DEFAULT_WAIT_S
from simclr_embed.embed.store import FORMATS, errors_path
from simclr_embed.errors import SimclrError
from simclr_embed.inference.images import DEFAULT_MAX_PIXELS
from simclr_embed.server.config import TOKEN_ENV

if TYPE_CHECKING:
    from simclr_embed.client import EmbeddingClient
    from simclr_embed.client.codec import EmbedBatch
    from simclr_embed.embed.offline import OfflineEmbedder

PATHS_SUFFIX = ".paths.txt"


@dataclass(frozen=True)
class EmbedConfig:
    paths: tuple[Path, ...]
    output: Path
    fmt: str
    target: str | None = None
    model: Path | None = None
    ray: str | None = None  # None: no Ray; "local": a local Ray; else an address for ray.init
    device: str = "auto"
    kind: str = "features"
    normalize: bool = False
    on_error: str = "skip"
    resume: bool = False
    overwrite: bool = False
    update: bool = False
    batch: int = 64
    concurrency: int = 2
    timeout: float = 300.0
    wait_s: float = DEFAULT_WAIT_S
    resend: int = 8
    part_size: int = 4096
    decode_threads: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    token: str | None = None
    tls: bool | Path = False
    progress: bool = True
    stream: bool = True
    verbose: bool = False
    log_format: str = "text"  # text | json (simclr_embed.logs)
    otlp_endpoint: str | None = None  # trace the job (simclr_embed.tracing) [off]
    otlp_protocol: str = "grpc"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simclr embed",
        description=__doc__.splitlines()[0],
        epilog="Exit codes: 0 done (skipped files listed), 1 runtime failure, 2 bad usage.",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files and/or folders (searched recursively)")  # fmt: skip
    where = p.add_mutually_exclusive_group()
    where.add_argument("--target", help="server(s): HOST:PORT, several comma-separated, or dns:///NAME:PORT")  # fmt: skip
    where.add_argument("--model", type=Path, help="embed in this process with this .onnx (or .pt2); no server")  # fmt: skip
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run as a Ray Data pipeline (needs --model, --format parquet); ADDRESS as "
                   "for ray.init (ray://head:10001, auto); none: a local Ray on this machine")  # fmt: skip
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="--model/--ray: where the model runs [auto]")  # fmt: skip
    p.add_argument("--kind", choices=("features", "projection"), default="features",
                   help="backbone features (for downstream use) or projection-head output [features]")  # fmt: skip
    p.add_argument("--normalize", action="store_true", help="L2-normalize each vector")
    p.add_argument("--output", type=Path, default=Path("embeddings.npy"),
                   help=f"the .npy to write (its path list goes to OUTPUT{PATHS_SUFFIX}), or the "
                   "Parquet folder [embeddings.npy]")  # fmt: skip
    p.add_argument("--format", dest="fmt", choices=FORMATS, default=None, help="npy or parquet [npy for an .npy OUTPUT, else parquet]")  # fmt: skip
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="skip: leave unusable files out and list them in OUTPUT.errors.tsv; "
                   "fail: stop at the first one (exit 1) [skip]")  # fmt: skip
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted run into the same OUTPUT")  # fmt: skip
    again.add_argument("--overwrite", action="store_true",
                       help="replace an existing OUTPUT (the old one stays readable until the "
                       "new one is complete); without it an existing OUTPUT is refused")  # fmt: skip
    again.add_argument("--update", action="store_true",
                       help="bring a finished OUTPUT up to date: embed only files that are new "
                       "or changed (size/mtime), drop rows of deleted ones, keep the rest")  # fmt: skip
    p.add_argument("--batch", type=int, default=64, help="images per request / model call [64]")
    p.add_argument("--concurrency", type=int, default=2, help="--target: requests in flight [2]")
    p.add_argument("--timeout", type=float, default=300.0, help="--target: seconds per request [300]")  # fmt: skip
    p.add_argument("--wait-s", type=float, default=DEFAULT_WAIT_S,
                   help="--target: how long to wait for a SERVING server at the start, saying "
                   f"why while waiting [{DEFAULT_WAIT_S:g}]")  # fmt: skip
    p.add_argument("--resend", type=int, default=8,
                   help="--target: re-sends of a request after gRPC's own retries gave up "
                   "(UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED; backoff 1-30 s) [8]")  # fmt: skip
    p.add_argument("--part-size", type=int, default=4096, help="inputs per committed part (what a --resume may redo) [4096]")  # fmt: skip
    p.add_argument("--decode-threads", type=int, default=0, help="--model: decode threads; 0 = cores [0]")  # fmt: skip
    p.add_argument("--token", default=None, help=f"bearer token [env {TOKEN_ENV}]")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system root CAs)")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM root CA to trust (implies --tls)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-stream",
        action="store_true",
        help="--target: one unary Embed call per batch instead of one EmbedStream",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="--target: print the server's decode/queue/inference time percentiles at the end",
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="json: messages as one JSON object per line on stderr [text]")  # fmt: skip
    p.add_argument("--otlp-endpoint", default=None, metavar="HOST:PORT|URL", help="trace the job to this OTLP collector; the servers' spans join its trace (tracing extra) [off]")  # fmt: skip
    p.add_argument("--otlp-protocol", choices=("grpc", "http"), default="grpc", help="OTLP over gRPC or HTTP/protobuf [grpc]")  # fmt: skip
    return p


def parse_config(argv: Sequence[str] | None) -> EmbedConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch", "concurrency", "part_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("resend", "decode_threads"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.timeout <= 0 or args.wait_s < 0:
        parser.error("--timeout must be > 0 and --wait-s >= 0")
    if args.ray is None and args.target is None and args.model is None:
        parser.error("one of --target (a server) or --model (in this process) is required")
    if args.ray is not None:
        if args.model is None:
            parser.error("--ray needs --model (the pipeline runs the model itself, no server)")
        if args.fmt != "parquet":
            parser.error("--ray writes Parquet: add --format parquet and a folder --output")
        if args.update:
            parser.error("--update is not available with --ray; run it with --model or --target")
    fmt = args.fmt or ("npy" if args.output.suffix == ".npy" else "parquet")
    if fmt == "parquet" and args.output.suffix == ".npy":
        parser.error(f"--format parquet writes a folder; --output {args.output} is an .npy path")
    if args.target is not None and args.device != "auto":
        parser.error("--device applies to --model; the server chose its own device")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    return EmbedConfig(
        paths=tuple(args.paths),
        output=args.output,
        fmt=fmt,
        target=args.target,
        model=args.model,
        ray=args.ray,
        device=args.device,
        kind=args.kind,
        normalize=args.normalize,
        on_error=args.on_error,
        resume=args.resume,
        overwrite=args.overwrite,
        update=args.update,
        batch=args.batch,
        concurrency=args.concurrency,
        timeout=args.timeout,
        wait_s=args.wait_s,
        resend=args.resend,
        part_size=args.part_size,
        decode_threads=args.decode_threads,
        token=token,
        tls=args.tls_ca if args.tls_ca is not None else args.tls,
        progress=not args.no_progress,
        stream=not args.no_stream,
        verbose=args.verbose,
        log_format=args.log_format,
        otlp_endpoint=args.otlp_endpoint,
        otlp_protocol=args.otlp_protocol,
    )


def _engine(cfg: EmbedConfig) -> OfflineEmbedder | _Remote:
    return open_engine(
        cfg.target,
        cfg.model,
        device=cfg.device,
        batch=cfg.batch,
        decode_threads=cfg.decode_threads,
        max_pixels=cfg.max_pixels,
        token=cfg.token,
        tls=cfg.tls,
        timeout=cfg.timeout,
        resend=cfg.resend,
        wait_s=cfg.wait_s,
        concurrency=cfg.concurrency,
        stream=cfg.stream,
    )


def open_engine(
    target: str | None,
    model: Path | None,
    *,
    device: str = "auto",
    batch: int = 64,
    decode_threads: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    token: str | None = None,
    tls: bool | Path = False,
    timeout: float = 300.0,
    resend: int = 8,
    wait_s: float = DEFAULT_WAIT_S,
    concurrency: int = 2,
    stream: bool = True,
) -> OfflineEmbedder | _Remote:
    """What embeds files: ``model`` in this process, else the server(s) at ``target`` (waited
    for up to ``wait_s``). Both offer ``model_info()``, ``embed_iter(...)`` and ``close()``."""
    if model is not None:
        from simclr_embed.embed.offline import OfflineEmbedder

        return OfflineEmbedder(
            model, device=device, batch=batch, decode_threads=decode_threads, max_pixels=max_pixels
        )
    from simclr_embed.client import EmbeddingClient
    from simclr_embed.client.health import check_target, wait_for_serving

    # Says at once what is wrong (refused, TLS, token, NOT_SERVING, a URL), and keeps saying it.
    wait_for_serving(check_target(target or ""), wait_s=wait_s, tls=tls, token=token, say=_say)
    client = EmbeddingClient(
        target or "", token, tls=tls, timeout=timeout, max_batch=batch, resend=resend
    )
    return _Remote(client, concurrency, stream)


_JSON_LOGS = False  # set by main from --log-format: then every message is a log record


def _say(line: str) -> None:
    if _JSON_LOGS:
        logging.getLogger("simclr_embed.embed").info(line)
    else:
        print(line, file=sys.stderr, flush=True)


class _Remote:
    """The client as a bulk-job engine: its ``embed_iter`` at the CLI's concurrency."""

    def __init__(self, client: EmbeddingClient, concurrency: int, stream: bool = True) -> None:
        self.client, self.concurrency, self.stream = client, concurrency, stream

    def model_info(self) -> dict[str, Any]:
        return self.client.model_info()

    def embed_iter(
        self, images: Iterable[Any], kind: str, normalize: bool, *, on_error: str
    ) -> Iterator[EmbedBatch]:
        return self.client.embed_iter(
            images,
            kind,
            normalize,
            concurrency=self.concurrency,
            on_error=on_error,
            stream=self.stream,
        )

    def close(self) -> None:
        self.client.close()


def _run_ray(cfg: EmbedConfig) -> tuple[int, int, int, str]:
    from simclr_embed.embed.job import JobConfig, check_output, check_paths, iter_inputs
    from simclr_embed.embed.ray_job import run_ray
    from simclr_embed.inference.runtime import open_runtime

    check_paths(cfg.paths)
    check_output(
        JobConfig(cfg.paths, cfg.output, "parquet", resume=cfg.resume, overwrite=cfg.overwrite)
    )
    runtime = open_runtime(cfg.model, device="cpu", max_batch_size=1)  # the model's facts
    info = runtime.info
    dim = info.projection_dim if cfg.kind == "projection" else info.feature_dim
    job = {"format": "parquet", "model_version": info.model_version, "kind": cfg.kind,
           "normalize": cfg.normalize, "dimension": dim}  # fmt: skip
    inputs = [str(p) for p in iter_inputs(cfg.paths)]
    if not inputs:
        raise SimclrError(f"no images found in {', '.join(map(str, cfg.paths))}")
    rows, skipped = run_ray(
        None if cfg.ray == "local" else cfg.ray, cfg.model, inputs, cfg.output, kind=cfg.kind,
        normalize=cfg.normalize, on_error=cfg.on_error, batch=cfg.batch, device=cfg.device,
        job=job, info=info, max_pixels=cfg.max_pixels, resume=cfg.resume and not cfg.overwrite, say=_say,
    )  # fmt: skip
    return rows, skipped, dim, info.model_version


def main(argv: Sequence[str] | None = None) -> int:
    global _JSON_LOGS
    cfg = parse_config(argv)
    if cfg.log_format == "json":  # text: the plain lines below, as before
        from simclr_embed import logs

        logs.configure("json", logging.INFO, secrets=[cfg.token])
        _JSON_LOGS = True
    from simclr_embed import tracing

    tracing.setup("simclr-embed", cfg.otlp_endpoint, cfg.otlp_protocol)
    try:  # one trace for the job: the servers' spans join it through every call's metadata
        with tracing.root_span("simclr embed", **{"simclr.output": str(cfg.output)}):
            return _run(cfg)
    finally:
        tracing.shutdown()


def _run(cfg: EmbedConfig) -> int:
    import grpc  # after argument checks: `--help` stays fast
    from tqdm import tqdm

    from simclr_embed.client import EmbeddingError
    from simclr_embed.embed.job import JobConfig, check_output, check_paths, run_job

    if cfg.ray is not None:
        rows, skipped, dim, version = _run_ray(cfg)
        already = False
    else:
        source = f"the server at {cfg.target}" if cfg.target else f"the model {cfg.model}"
        job = JobConfig(cfg.paths, cfg.output, cfg.fmt, cfg.kind, cfg.normalize, cfg.on_error,
                        cfg.resume, cfg.part_size, cfg.overwrite, source, update=cfg.update)  # fmt: skip
        check_paths(cfg.paths)
        check_output(job)  # before waiting for a server: an existing OUTPUT is refused at once
        engine = None
        timings: list[tuple[float, float, float]] = []
        try:
            engine = _engine(cfg)
            with tqdm(unit="img", disable=not cfg.progress, file=sys.stderr) as bar:

                def on_batch(batch: EmbedBatch) -> None:
                    bar.update(batch.count)
                    if batch.timings is not None:
                        timings.append(batch.timings)

                summary = run_job(job, engine, on_batch=on_batch, say=_say)
        except EmbeddingError as exc:
            raise SimclrError(f"{cfg.target}: {exc}") from None
        except grpc.RpcError as exc:  # health/connection problems outside embed_iter
            raise SimclrError(f"{cfg.target}: {exc.code().name}: {exc.details()}") from None
        finally:
            if engine is not None:
                engine.close()
        rows, skipped, dim = summary.rows, summary.skipped, summary.dimension
        version, already = summary.model_version, summary.already_complete
    what = f"{cfg.kind}{', L2-normalized' if cfg.normalize else ''}"
    where = f"{cfg.output}" + (
        f" + {cfg.output}{PATHS_SUFFIX}" if cfg.fmt == "npy" else " (Parquet)"
    )
    status = "already complete: " if already else ""
    print(f"{status}embedded N={rows} images, D={dim} ({what}) with model {version} -> {where}")
    if skipped:
        print(f"skipped {skipped} unusable file(s), listed in {errors_path(cfg.output)}")
    if cfg.verbose and cfg.ray is None and timings:
        print(timing_report(timings))
    return 0


def timing_report(timings: Sequence[tuple[float, float, float]]) -> str:
    """Percentiles of the server's per-request stage times: is the time in decoding, in the
    queue (the server is busy), or in the model?"""
    import numpy as np

    arr = np.asarray(timings)  # [requests, 3] ms
    lines = [
        f"server time per request over {len(arr)} requests (ms):",
        "  stage      p50     p90     p99",
    ]
    for k, name in enumerate(("decode", "queue", "inference")):
        p50, p90, p99 = np.percentile(arr[:, k], (50, 90, 99))
        lines.append(f"  {name:<9} {p50:7.1f} {p90:7.1f} {p99:7.1f}")
    return "\n".join(lines)
