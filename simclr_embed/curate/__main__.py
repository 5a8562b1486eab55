"""``python -m simclr_embed.curate ...`` is ``simclr curate ...``."""

from simclr_embed.curate.cli import main
from simclr_embed.errors import run_main

if __name__ == "__main__":
    raise SystemExit(run_main(main))
