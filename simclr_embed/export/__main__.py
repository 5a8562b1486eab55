"""``python -m export ...`` — same as ``simclr export-onnx ...``."""

from export.cli import main
from simclr_embed.cli import run_main

raise SystemExit(run_main(main))
