"""``python -m server``: the same as ``simclr serve``."""

from server.cli import main
from simclr_embed.cli import run_main

raise SystemExit(run_main(main))
