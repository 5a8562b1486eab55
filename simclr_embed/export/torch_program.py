"""Checkpoint → ``torch.export`` program (``.pt2``): the same wrapped model as the ONNX file.

Same input (uint8 ``images [N, S, S, 3]``, N dynamic), same outputs (``features`` ``[N, F]``,
``projection`` ``[N, P]``) and the same ``simclr.*`` metadata (``simclr.json`` inside the
archive), so ``simclr serve --model model.pt2`` answers like the ONNX model. It is always the
fp32 program: the torch runtime picks bf16/fp16 autocast on the GPU at serve time. The wrapper
has no device or dtype baked in (``ImageEncoder``), so the program moves to any device.

Verification loads the written file with the server's own loader and checks it like the ONNX
file (batch 1 and 7, batch independence, fp32 tolerances).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simclr_embed.errors import SimclrError
from simclr_embed.export.onnx_export import INPUT_NAME, load_encoder
from simclr_embed.fileio import atomic_path
from simclr_embed.inference.torch_runtime import (  # the loader the server uses
    METADATA_FILE,
    load_program,
)

log = logging.getLogger(__name__)

MAX_BATCH = 65536


def export_program(encoder: torch.nn.Module, image_size: int) -> torch.export.ExportedProgram:
    """Trace ``encoder`` with a symbolic batch axis (N=2 traced: size-1 dims are specialised)."""
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("N", min=1, max=MAX_BATCH)
    try:
        with torch.no_grad():
            return torch.export.export(encoder, (example,), dynamic_shapes={INPUT_NAME: {0: batch}})
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SimclrError(f"torch.export failed: {first}") from exc


def export_torch_program(
    checkpoint: str | Path,
    output: str | Path,
    metadata: dict[str, str],
    *,
    verify: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``output`` (atomically) with ``metadata`` (the ONNX export's ``simclr.*`` keys).

    With ``verify`` the saved program is loaded back and checked against the eager model like
    the ONNX file is (``simclr_embed.export.verify.check_parity``, fp32 tolerances: batch 1 and 7, each image
    alone = its row of the batch); on a failed check nothing is written.
    """
    from simclr_embed.export.verify import FP32, check_parity, format_parity

    features_from = metadata.get("simclr.features_from", "backbone")  # as the ONNX export
    encoder, ckpt = load_encoder(checkpoint, features_from=features_from)
    size = int(ckpt["config"]["image_size"])
    program = export_program(encoder, size)
    meta = {**metadata, "simclr.precision": "fp32", "simclr.format": "torch.export"}
    report: dict[str, Any] = {"output": str(output), "metadata": meta}
    buf = io.BytesIO()  # torch.export.save wants a .pt2 name or a buffer, not the temp name
    torch.export.save(program, buf, extra_files={METADATA_FILE: json.dumps(meta)})
    with atomic_path(output) as tmp:
        tmp.write_bytes(buf.getvalue())
        if verify:
            loaded = load_program(io.BytesIO(buf.getvalue()))[0].module()

            def run_with(module: torch.nn.Module) -> Any:
                def run(images: np.ndarray) -> list[np.ndarray]:
                    with torch.inference_mode():
                        return [t.numpy() for t in module(torch.from_numpy(images))]

                return run

            result = check_parity(run_with(loaded), run_with(encoder), size, FP32, seed=seed)
            if not result["ok"]:
                bad = [x for x in format_parity(result, "torch program") if x.endswith("FAIL")]
                raise SimclrError(f"torch program parity check failed: {bad[0]}")
            report["parity"] = result
    report["bytes"] = Path(output).stat().st_size
    log.info("wrote torch program %s", output)
    return report
