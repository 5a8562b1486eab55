"""``simclr serve`` / ``python -m simclr_embed.server``: parse flags, configure logging, run the server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from simclr_embed import logs
from simclr_embed.server.config import build_parser, config_from_args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    cfg = config_from_args(parser.parse_args(argv), parser)
    logs.configure(cfg.log_format, cfg.log_level, secrets=[cfg.auth_token])
    if cfg.processes > 1:
        from simclr_embed.server.group import run_group

        return run_group(cfg, argv)
    from simclr_embed.server.app import (
        serve,  # after logging is set up: grpc/onnxruntime import here
    )

    return asyncio.run(serve(cfg))
