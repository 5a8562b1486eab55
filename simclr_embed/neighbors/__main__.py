"""``python -m simclr_embed.neighbors ...`` is ``simclr neighbors ...``."""

from simclr_embed.errors import run_main
from simclr_embed.neighbors.cli import main

if __name__ == "__main__":
    raise SystemExit(run_main(main))
