"""``simclr train`` / ``python -m simclr_embed.training`` / ``torchrun ... -m simclr_embed.training``: parse, log, train."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from simclr_embed import logs
from simclr_embed.training.config import parse_config


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv)  # bad usage exits 2 here, before torch is imported
    logs.configure(cfg.log_format, logging.INFO, datefmt="%H:%M:%S")
    from simclr_embed.training.train import main as train_main

    return train_main(cfg)
