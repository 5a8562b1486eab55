"""``python -m simclr_embed.server``: the same as ``simclr serve``."""

from simclr_embed.errors import run_main
from simclr_embed.server.cli import main

raise SystemExit(run_main(main))
