"""Checkpoint format (v1) and loading; writing lives here too so there is one definition.

A checkpoint is a plain dict, loadable with ``torch.load(path, weights_only=True)``::

    {
      "format": "simclr-embed/checkpoint/v1",
      "model": state_dict of SimCLRModel (no DDP ``module.`` prefix),
      "config": resolved training config (JSON-able dict: arch, stem, image_size, proj_dim,
                mean, std, ... every TrainConfig field),
      "step": int (optimizer steps done), "epoch": int,
      "optimizer": ..., "scheduler": ..., "scaler": ... (may be None), "rng": {...},
    }
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from simclr_embed.errors import SimclrError

FORMAT = "simclr-embed/checkpoint/v1"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; raise ``SimclrError`` with a one-line reason if unusable."""
    path = Path(path)
    if not path.is_file():
        raise SimclrError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, unsafe pickle, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SimclrError(f"cannot read checkpoint {path}: {reason}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise SimclrError(f"{path} is not a simclr-embed checkpoint (no '{FORMAT}' marker)")
    for key in ("model", "config", "step"):
        if key not in ckpt:
            raise SimclrError(f"checkpoint {path} lacks '{key}'")
    return ckpt
