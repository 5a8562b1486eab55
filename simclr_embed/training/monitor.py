"""The ``--eval-data`` monitor: weighted kNN top-1 (k=20, cosine, T=0.07) of backbone features.

The labeled folder is read with the evaluator's reader (``simclr_embed.labeled.list_labeled``) and the
serving/eval preprocessing (``simclr_embed.imageio.load_uint8``: ``apply_resize`` with
``resize_policy_for(S)``, then the training mean/std), so the number tracks what ``simclr
evaluate`` will report. If the folder has ``train/`` and ``val/`` subfolders they are the bank
and the queries; otherwise a deterministic stratified split puts every 4th file of each class in
the query set and the rest in the bank. An unreadable eval image is skipped with a warning.
Runs on rank 0 only, on the unwrapped model in eval mode (no collectives).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from simclr_embed.errors import SimclrError
from simclr_embed.imageio import load_uint8, resize_policy_for
from simclr_embed.labeled import check_same_classes, list_labeled
from simclr_embed.training.augment import normalize_uint8
from simclr_embed.training.knn import knn_top1
from simclr_embed.training.preemption import ignore_in_worker

logger = logging.getLogger(__name__)


class LabeledImages(Dataset):
    """``dataset[i]`` → ``(uint8 [S, S, 3], label)``; an unreadable file gives label -1."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], image_size: int) -> None:
        self.paths, self.labels = list(paths), list(labels)
        self.image_size, self.policy = image_size, resize_policy_for(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            x = torch.from_numpy(load_uint8(self.paths[i], self.image_size, self.policy))
        except SimclrError as exc:
            logger.warning("kNN monitor: skipping %s", exc)
            return torch.zeros(self.image_size, self.image_size, 3, dtype=torch.uint8), -1
        return x, self.labels[i]


def _listed(root: Path) -> tuple[list[Path], list[int], list[str]]:
    try:
        return list_labeled(root)
    except SimclrError as exc:
        raise SimclrError(f"--eval-data: {exc}") from None


def load_eval_sets(root: str | Path, image_size: int) -> tuple[LabeledImages, LabeledImages, int]:
    """``(bank, queries, num_classes)`` from a labeled folder (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise SimclrError(f"--eval-data {root}: no such folder")
    if (root / "train").is_dir() and (root / "val").is_dir():
        bp, bl, names = _listed(root / "train")
        qp, ql, qnames = _listed(root / "val")
        check_same_classes(names, qnames)
        return LabeledImages(bp, bl, image_size), LabeledImages(qp, ql, image_size), len(names)
    paths, labels, names = _listed(root)
    bank: tuple[list[Path], list[int]] = ([], [])
    query: tuple[list[Path], list[int]] = ([], [])
    seen = [0] * len(names)
    for p, c in zip(paths, labels, strict=True):
        target = query if seen[c] % 4 == 3 else bank
        target[0].append(p)
        target[1].append(c)
        seen[c] += 1
    if not query[0]:
        raise SimclrError(
            f"--eval-data {root}: too few images for a bank/query split (need ≥ 4 per class)"
        )
    return LabeledImages(*bank, image_size), LabeledImages(*query, image_size), len(names)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: LabeledImages,
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 256,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features ``[N, F]`` (float32, on ``device``) and labels ``[N]`` of readable images."""
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_in_worker if workers > 0 else None,
    )
    feats, labels = [], []
    try:
        for x, y in loader:
            keep = y >= 0
            if not keep.any():
                continue
            x = normalize_uint8(x[keep].to(device, non_blocking=True), mean, std)  # [B, 3, S, S]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                h = model.forward_features(x)  # [B, F]
            feats.append(h.float())
            labels.append(y[keep].to(device))
    finally:
        model.train(was_training)
    if not feats:
        raise SimclrError("--eval-data: none of the eval images could be read")
    return torch.cat(feats), torch.cat(labels)


def knn_monitor(
    model: nn.Module,
    bank: LabeledImages,
    queries: LabeledImages,
    num_classes: int,
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    **kw: object,
) -> float:
    """Weighted kNN top-1 (k=20, T=0.07, cosine) of the queries against the bank, in [0, 1]."""
    bank_feats, bank_labels = extract_features(model, bank, device, mean, std, **kw)  # type: ignore[arg-type]
    query_feats, query_labels = extract_features(model, queries, device, mean, std, **kw)  # type: ignore[arg-type]
    return knn_top1(
        bank_feats, bank_labels, query_feats, query_labels, num_classes, k=20, temperature=0.07
    )
