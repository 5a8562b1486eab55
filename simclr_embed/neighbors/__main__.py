"""``python -m neighbors ...`` is ``simclr neighbors ...``."""

from neighbors.cli import main
from simclr_embed.cli import run_main

if __name__ == "__main__":
    raise SystemExit(run_main(main))
