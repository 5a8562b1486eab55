"""``python -m simclr_embed.demo`` (what ``make demo`` runs)."""

from simclr_embed.demo.pipeline import main
from simclr_embed.errors import run_main

raise SystemExit(run_main(main))
