"""``python -m simclr_embed.export ...`` — same as ``simclr export-onnx ...``."""

from simclr_embed.errors import run_main
from simclr_embed.export.cli import main

raise SystemExit(run_main(main))
