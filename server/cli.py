"""``simclr serve`` / ``python -m server``: parse flags, configure logging, run the server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from server.config import build_parser, config_from_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    cfg = config_from_args(parser.parse_args(argv), parser)
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from server.app import serve  # after logging is set up: grpc/onnxruntime import here

    return asyncio.run(serve(cfg))
