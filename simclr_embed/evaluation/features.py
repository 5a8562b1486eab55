"""Frozen backbone features of image files, from an ONNX model, a checkpoint, or raw pixels.

One definition of "an image in" for every model kind: ``open_image`` → ``apply_resize(img, S,
policy)`` → uint8 ``[S, S, 3]`` (``load_uint8``). The ONNX graph takes those bytes as they are
(it casts, scales and normalizes inside); the checkpoint path normalizes with the config's
mean/std exactly as the exported graph does, so both give the same features (~1e-5).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from simclr_embed.errors import SimclrError
from simclr_embed.imageio import IMAGENET_MEAN, IMAGENET_STD, load_uint8, resize_policy_for
from simclr_embed.training.augment import normalize_uint8

log = logging.getLogger(__name__)


class Embedder(Protocol):
    """Maps a uint8 ``[N, S, S, 3]`` batch to float32 features ``[N, F]``."""

    image_size: int
    resize: str
    description: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class OnnxEmbedder:
    """An exported model through ONNX Runtime (output ``features``)."""

    def __init__(self, path: Path, device: str = "auto") -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise SimclrError(f"model not found: {path}")
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            if hasattr(ort, "preload_dlls"):
                try:
                    ort.preload_dlls()
                except Exception as exc:  # a missing CUDA library: ORT falls back to CPU
                    log.debug("onnxruntime.preload_dlls failed: %s", exc)
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:
            raise SimclrError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0]}") from exc
        in_use = self.session.get_providers()  # the truth, unlike get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in in_use:
            raise SimclrError(f"--device cuda: ONNX Runtime runs on {', '.join(in_use)} only")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)  # the untrained baseline is built from it (no second session)
        if "simclr.image_size" not in meta:
            raise SimclrError(
                f"{path} has no 'simclr.image_size' metadata; export it with 'simclr export-onnx'"
            )
        outputs = [o.name for o in self.session.get_outputs()]
        if "features" not in outputs:
            raise SimclrError(f"{path} has no 'features' output (outputs: {', '.join(outputs)})")
        self.image_size = int(meta["simclr.image_size"])
        self.resize = meta.get("simclr.resize") or resize_policy_for(self.image_size)
        self.input_name = self.session.get_inputs()[0].name
        self.description = (
            f"{path.name} (ONNX, {meta.get('simclr.arch', '?')}, "
            f"{self.image_size} px, {', '.join(in_use)})"
        )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(["features"], {self.input_name: batch})
        return np.asarray(out, dtype=np.float32)  # [N, F]


class TorchEmbedder:
    """A training checkpoint through PyTorch (``forward_features`` in eval mode)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        from simclr_embed.training.checkpoint import load_checkpoint
        from simclr_embed.training.model import build_model

        ckpt = load_checkpoint(path)
        cfg = ckpt["config"]
        try:
            model = build_model(cfg)
            model.load_state_dict(ckpt["model"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise SimclrError(
                f"checkpoint {path} does not match its config: {str(exc).splitlines()[0]}"
            ) from exc
        self._setup(model, cfg, device)
        self.description = (
            f"{path.name} (PyTorch, {model.arch}, {model.stem} stem, "
            f"{self.image_size} px, step {ckpt['step']}, {device})"
        )

    def _setup(self, model: torch.nn.Module, cfg: dict, device: torch.device) -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.image_size = int(cfg["image_size"])
        self.resize = resize_policy_for(self.image_size)
        self.mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
        self.std = tuple(cfg.get("std") or IMAGENET_STD)

    @classmethod
    def untrained(
        cls, model: str, device: torch.device, seed: int = 0, metadata: dict | None = None
    ) -> TorchEmbedder:
        """The same architecture as ``model`` (a ``.pt`` or an exported ``.onnx``, whose
        ``metadata`` an :class:`OnnxEmbedder` already read) at step 0: torchvision's
        initialization under ``seed`` — the baseline training must beat."""
        from simclr_embed.training.model import build_model

        cfg = _architecture(Path(model), metadata)
        torch.manual_seed(seed)
        net = build_model(cfg)
        self = cls.__new__(cls)
        self._setup(net, cfg, device)
        self.description = (
            f"untrained {net.arch} ({net.stem} stem, {self.image_size} px, step 0, seed {seed})"
        )
        return self

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = normalize_uint8(torch.from_numpy(batch).to(self.device), self.mean, self.std)
        return self.model.forward_features(x).float().cpu().numpy()  # [N, F]


def _architecture(path: Path, metadata: dict | None = None) -> dict:
    """arch, stem, image size, projection size and mean/std of a checkpoint or exported model."""
    if path.suffix == ".pt":
        from simclr_embed.training.checkpoint import load_checkpoint

        return dict(load_checkpoint(path)["config"])
    m = metadata
    if m is None:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        m = session.get_modelmeta().custom_metadata_map
    try:
        return {
            "arch": m["simclr.arch"],
            "stem": m.get("simclr.stem"),
            "image_size": int(m["simclr.image_size"]),
            "proj_dim": int(m["simclr.projection_dim"]),
            "mean": [float(v) for v in m["simclr.mean"].split(",")],
            "std": [float(v) for v in m["simclr.std"].split(",")],
        }
    except (KeyError, ValueError) as exc:
        raise SimclrError(f"{path}: its metadata does not say the architecture ({exc})") from None


class PixelEmbedder:
    """Raw-pixel baseline: the normalized S×S×3 model input, flattened (``[N, 3·S·S]``).

    Normalizing with the ImageNet mean/std centres the pixels, so cosine similarity compares
    contrast patterns rather than overall brightness.
    """

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.resize = resize_policy_for(image_size)
        self.description = f"raw pixels ({image_size}×{image_size}×3 = {3 * image_size**2}-d)"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = normalize_uint8(torch.from_numpy(batch), IMAGENET_MEAN, IMAGENET_STD)
        return x.flatten(1).numpy()  # [N, 3·S·S]


def build_embedder(model: str, device: torch.device, image_size: int = 32) -> Embedder:
    """``model``: a ``.onnx`` file, a ``.pt`` checkpoint, or ``pixels``."""
    if model == "pixels":
        return PixelEmbedder(image_size)
    path = Path(model)
    if path.suffix == ".onnx":
        return OnnxEmbedder(path, device.type)
    if path.suffix == ".pt":
        return TorchEmbedder(path, device)
    raise SimclrError(f"--model must be a .onnx file, a .pt checkpoint or 'pixels', got {model}")


def embed_paths(
    embedder: Embedder,
    paths: Sequence[Path],
    batch_size: int = 256,
    workers: int = 4,
    progress: str | None = None,
) -> tuple[np.ndarray, float]:
    """Features ``[N, F]`` of ``paths`` in order, and the images/s achieved (decode included).

    Decoding runs on ``workers`` threads (Pillow releases the GIL while decoding and resizing)
    and overlaps the model call of the previous batch.
    """
    if not paths:
        raise SimclrError("no images to embed")
    size, policy = embedder.image_size, embedder.resize
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    out: list[np.ndarray] = []
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(paths),
        desc=progress,
        unit="img",
        disable=True if progress is None else None,
        leave=False,
    )
    with bar, ThreadPoolExecutor(max(1, workers)) as pool:

        def load(chunk: Sequence[Path]) -> np.ndarray:
            return np.stack(list(pool.map(lambda p: load_uint8(p, size, policy), chunk)))

        with ThreadPoolExecutor(1) as prefetch:  # decode batch i+1 while the model runs batch i
            pending = prefetch.submit(load, chunks[0])
            for i in range(len(chunks)):
                batch = pending.result()  # [B, S, S, 3] uint8
                if i + 1 < len(chunks):
                    pending = prefetch.submit(load, chunks[i + 1])
                out.append(embedder(batch))
                bar.update(len(batch))
    seconds = time.perf_counter() - t0
    feats = np.concatenate(out)
    if not np.isfinite(feats).all():
        raise SimclrError("the model produced non-finite features (NaN/inf)")
    return feats, len(paths) / max(seconds, 1e-9)
