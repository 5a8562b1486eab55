"""``python -m simclr_embed.training`` (what ``torchrun ... -m simclr_embed.training`` runs)."""

from simclr_embed.errors import run_main
from simclr_embed.training.cli import main

raise SystemExit(run_main(main))
