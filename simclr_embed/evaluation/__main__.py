"""``python -m evaluation ...`` is ``simclr evaluate ...``."""

import logging

from evaluation.cli import main
from simclr_embed.cli import run_main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(run_main(main))
