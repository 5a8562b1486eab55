"""Training data: any folder of images (recursive, labels ignored) → batches of two views.

Bad files never stop training: a file that fails to decode is replaced, for that sample, by the
next readable file (deterministically), and its path travels back with the batch so that the main
process can warn about it once and count it (workers are separate processes: a warning or counter
kept in a worker would be invisible or lost). The batch size therefore stays fixed.

The sampler yields ``(index, epoch)`` keys. The dataset derives each sample's augmentation seed
from ``(seed, epoch, index)`` (see ``simclr_embed.training.augment``): with persistent workers the dataset copy
inside a worker never sees ``set_epoch`` calls made in the main process, and worker RNG streams
depend on how samples are spread over workers — per-sample seeds make the views independent of
both, so a resumed run, with any ``--workers``, sees the same views as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

from simclr_embed.errors import SimclrError
from simclr_embed.imageio import IMAGE_EXTENSIONS, list_images, open_image
from simclr_embed.training.augment import SimCLRAugment, sample_seed
from simclr_embed.training.preemption import ignore_in_worker

# How many substitutes one sample tries before the batch is declared unusable (all bad).
MAX_SUBSTITUTES = 16


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def find_images(root: str | Path, flag: str = "--data") -> list[Path]:
    """All images under ``root``; ``SimclrError`` (exit 1) if the folder is missing or has none."""
    root = Path(root)
    if not root.exists():
        raise SimclrError(f"{flag} {root}: no such folder")
    if not root.is_dir():
        raise SimclrError(f"{flag} {root}: not a folder")
    paths = list_images(root)
    if not paths:
        exts = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise SimclrError(f"{flag} {root}: no image files found (searched recursively for {exts})")
    return paths


class UnlabeledImages(Dataset):
    """``dataset[(index, epoch)]`` → ``(view1, view2, failed_paths, ok)``.

    ``view*``: ``[3, S, S]`` float (normalized) or uint8 (geometry only); ``failed_paths``: the
    files that could not be decoded on the way; ``ok`` is False only when ``MAX_SUBSTITUTES``
    files in a row failed (then the views are zeros and training stops with a clear error).
    """

    def __init__(self, paths: Sequence[Path], augment: SimCLRAugment, seed: int = 0) -> None:
        self.paths = list(paths)
        self.augment = augment
        self.seed = seed
        # Large JPEGs decode at a reduced DCT scale, still ≥ 4·S on the short side: a 0.08-area
        # crop keeps ≈ 0.28 of the side, so it is still not upsampled.
        self.draft_size = 4 * augment.image_size
        self._bad: set[int] = set()  # per process: known-bad indices are not decoded again

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(
        self, key: int | tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], bool]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        failed: list[str] = []
        n = len(self.paths)
        for attempt in range(min(MAX_SUBSTITUTES, n)):
            i = (index + attempt) % n
            if i in self._bad:
                continue
            try:
                img = open_image(self.paths[i], draft_size=self.draft_size)
            except Exception as exc:  # truncated, not an image, decompression bomb, ...: skip it
                self._bad.add(i)
                failed.append(f"{self.paths[i]} ({_reason(exc)})")
                continue
            v1, v2 = self.augment(img, seed=sample_seed(self.seed, epoch, index))
            return v1, v2, failed, True
        dtype = torch.float32 if self.augment.appearance_on_cpu else torch.uint8
        zeros = torch.zeros(3, self.augment.image_size, self.augment.image_size, dtype=dtype)
        return zeros, zeros, failed, False


def collate_views(
    batch: list[tuple[torch.Tensor, torch.Tensor, list[str], bool]],
) -> dict[str, Any]:
    """Stack the views (``[B, 3, S, S]`` each); gather the failed paths; ``ok`` if all samples are."""
    return {
        "view1": torch.stack([b[0] for b in batch]),
        "view2": torch.stack([b[1] for b in batch]),
        "failed": [p for b in batch for p in b[2]],
        "ok": all(b[3] for b in batch),
    }


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (drop_last) that yields ``(index, epoch)`` and can start mid-epoch.

    Used in single-process runs too (``num_replicas=1``), so there is one code path. The order is
    a pure function of (seed, epoch), so skipping the first ``start_batch × batch_size`` indices
    of this rank resumes exactly where an interrupted run stopped.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_size: int
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start_batch * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.start :]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def build_train_loader(
    paths: Sequence[Path],
    augment: SimCLRAugment,
    *,
    batch_size: int,
    workers: int,
    seed: int,
    world_size: int,
    rank: int,
    pin_memory: bool,
) -> tuple[ResumableSampler, torch.utils.data.DataLoader]:
    dataset = UnlabeledImages(paths, augment, seed=seed)
    sampler = ResumableSampler(dataset, world_size, rank, seed, batch_size)
    extra: dict[str, Any] = {}
    if workers > 0:
        # Workers survive across epochs (no re-fork, warm decoders); 4 batches in flight each.
        extra = {"persistent_workers": True, "prefetch_factor": 4}
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_views,
        pin_memory=pin_memory,
        drop_last=True,
        worker_init_fn=ignore_in_worker if workers > 0 else None,  # stop signals are ours
        **extra,
    )
    return sampler, loader
