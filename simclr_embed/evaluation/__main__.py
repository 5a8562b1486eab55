"""``python -m simclr_embed.evaluation ...`` is ``simclr evaluate ...``."""

import logging

from simclr_embed.errors import run_main
from simclr_embed.evaluation.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(run_main(main))
