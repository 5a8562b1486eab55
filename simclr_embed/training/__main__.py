"""``python -m training`` (what ``torchrun ... -m training`` runs)."""

from simclr_embed.cli import run_main
from training.cli import main

raise SystemExit(run_main(main))
