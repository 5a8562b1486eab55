"""``simclr embed``: embed image files and folders through a running server into one ``.npy``.

    simclr embed --target 127.0.0.1:50051 --output out.npy photos/ extra.jpg

Writes ``out.npy`` (float32 ``[N, D]``, row i = the i-th path) and ``out.npy.paths.txt`` (the N
paths, one per line, in row order), both atomically; prints N, D and the model version.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from server.config import TOKEN_ENV
from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_path, atomic_write_text
from simclr_embed.imageio import list_images

PATHS_SUFFIX = ".paths.txt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simclr embed", description=__doc__.splitlines()[0])
    p.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="image files and/or folders (searched recursively)",
    )
    p.add_argument("--target", required=True, help="server address HOST:PORT")
    p.add_argument(
        "--kind",
        choices=("features", "projection"),
        default="features",
        help="backbone features (for downstream use) or projection-head output [features]",
    )
    p.add_argument("--normalize", action="store_true", help="L2-normalize each vector")
    p.add_argument(
        "--output",
        type=Path,
        default=Path("embeddings.npy"),
        help=f"the .npy to write; the path list goes to OUTPUT{PATHS_SUFFIX} [embeddings.npy]",
    )
    p.add_argument("--token", default=None, help=f"bearer token [env {TOKEN_ENV}]")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system root CAs)")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM root CA to trust (implies --tls)")
    p.add_argument("--batch", type=int, default=64, help="images per request [64]")
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight [2]")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request [300]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def collect_paths(paths: Sequence[Path]) -> list[Path]:
    """Files as given, folders expanded (recursive, sorted); missing paths are an error."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(list_images(path))
        elif path.is_file():
            found.append(path)
        else:
            raise SimclrError(f"no such file or folder: {path}")
    if not found:
        raise SimclrError(f"no images found in {', '.join(map(str, paths))}")
    return found


def write_outputs(output: Path, vectors: np.ndarray, paths: Sequence[Path]) -> Path:
    """The ``.npy`` and its path list, each atomically; returns the path-list file."""
    buf = io.BytesIO()
    np.save(buf, vectors)  # to a buffer: np.save on a path would append ".npy" to the temp name
    with atomic_path(output) as tmp:
        tmp.write_bytes(buf.getvalue())
    listing = output.with_name(output.name + PATHS_SUFFIX)
    atomic_write_text(listing, "".join(f"{p}\n" for p in paths))
    return listing


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.concurrency < 1:
        parser.error(f"--concurrency must be >= 1, got {args.concurrency}")
    import grpc  # after argument checks: `--help` stays fast
    from tqdm import tqdm

    from server.client import EmbeddingClient, EmbeddingError

    paths = collect_paths(args.paths)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    tls: bool | Path = args.tls_ca if args.tls_ca is not None else args.tls
    client = EmbeddingClient(
        args.target, token, tls=tls, timeout=args.timeout, max_batch=args.batch
    )
    try:
        info = client.model_info()
        with tqdm(total=len(paths), unit="img", disable=args.no_progress, file=sys.stderr) as bar:
            vectors = client.embed(
                paths,
                kind=args.kind,
                normalize=args.normalize,
                concurrency=args.concurrency,
                progress=bar.update,
            )
    except EmbeddingError as exc:
        where = f" ({paths[exc.index]})" if exc.index is not None else ""
        raise SimclrError(f"{args.target}{where}: {exc}") from None
    except grpc.RpcError as exc:  # health/connection problems outside embed()
        raise SimclrError(f"{args.target}: {exc.code().name}: {exc.details()}") from None
    except OSError as exc:
        raise SimclrError(f"cannot read image: {exc}") from None
    finally:
        client.close()
    listing = write_outputs(args.output, vectors, paths)
    n, d = vectors.shape
    print(
        f"embedded N={n} images, D={d} ({args.kind}{', L2-normalized' if args.normalize else ''}) "
        f"with model {info['model_version']} ({info['arch']}) -> {args.output} + {listing}"
    )
    return 0
