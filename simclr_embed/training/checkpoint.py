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

import io
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_write_bytes

FORMAT = "simclr-embed/checkpoint/v1"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; raise ``SimclrError`` with a one-line reason if unusable."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in (path / "checkpoints" / "last.pt", path / "last.pt") if p.is_file()]
        hint = (
            f"; did you mean {found[0]}?"
            if found
            else " (a run keeps it in OUT/checkpoints/last.pt)"
        )
        raise SimclrError(f"checkpoint {path} is a folder; give the .pt file{hint}")
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


# --------------------------------------------------------------------------------------------
# Writing (used by training): last.pt + step-N.pt, atomic, pruned; RNG capture/restore.
# --------------------------------------------------------------------------------------------

STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def capture_rng_state() -> dict[str, Any]:
    """torch / CUDA / numpy / python RNG states as tensors and ints (``weights_only``-loadable).

    numpy's state tuple holds an ndarray, which ``weights_only=True`` refuses: it is stored as an
    int64 tensor plus plain ints, and rebuilt by ``restore_rng_state``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state`` (CUDA states only if this process has the same devices)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``step-N.pt`` (by N); returns the deleted paths."""
    found = sorted(
        (int(m.group(1)), p) for p in Path(ckpt_dir).iterdir() if (m := STEP_FILE.match(p.name))
    )
    doomed = [p for _, p in found[: max(0, len(found) - keep)]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def save_checkpoint(ckpt_dir: str | Path, payload: dict[str, Any], keep: int) -> Path:
    """Write ``step-N.pt`` (if ``keep`` > 0) and ``last.pt`` atomically, then prune.

    ``payload`` needs ``step``; ``format`` is filled in. The bytes are serialized once and
    written to both files, each through temp file → fsync → rename, so a kill mid-write leaves
    the previous ``last.pt`` intact. Returns the path of ``last.pt``.
    """
    ckpt_dir = Path(ckpt_dir)
    payload = {"format": FORMAT, **payload}
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    if keep > 0:
        atomic_write_bytes(ckpt_dir / f"step-{int(payload['step'])}.pt", data)
    last = ckpt_dir / "last.pt"
    atomic_write_bytes(last, data)
    prune_checkpoints(ckpt_dir, keep)
    return last
