"""SimCLR augmentations (Chen et al. 2020, appendix A) on ``torchvision.transforms.v2``.

The recipe is split in two stages so that it can move to the GPU without changing its meaning:

- ``geometry`` — RandomResizedCrop (scale 0.08–1, bicubic) + horizontal flip, on the decoded PIL
  image, ending in a uint8 tensor ``[3, S, S]``. It must stay on the CPU next to the decoder: the
  crop is what brings arbitrary-size images to a fixed shape that can be batched.
- ``appearance`` — colour jitter (0.8s, 0.8s, 0.8s, 0.2s) with p=0.8, grayscale p=0.2, Gaussian
  blur p=0.5 (kernel ≈ 10% of S, σ∈[0.1, 2]; off for ≤ 64 px), then float + normalize. Every op
  here is a tensor op that runs unchanged on any device.

Today both stages run per sample inside the DataLoader workers (``SimCLRAugment(...)(img, seed)``).
To move the appearance stage to the GPU later: build the dataset with ``appearance_on_cpu=False``
so workers return uint8 crops (4× less host→device traffic than float), and after
``.to(device)`` call ``apply_per_sample(aug.appearance, batch)`` (or a vectorized replacement
drawing per-sample parameters; note that a v2 transform called on a whole ``[N, 3, S, S]`` batch
draws ONE set of random parameters for all N images, which is not the paper's recipe).

Determinism: all v2 transforms draw from torch's global CPU generator, so ``__call__`` seeds it
(inside ``torch.random.fork_rng``, leaving the caller's stream untouched) with a per-sample seed.
The views are then a pure function of (seed, image) — independent of worker count and of where a
resumed run restarts — which is what exact ``--resume`` needs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from simclr_embed.imageio import IMAGENET_MEAN, IMAGENET_STD


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel ≈ 10% of the image side (23 for 224 px), at least 3."""
    k = max(3, round(0.1 * image_size))
    return k if k % 2 == 1 else k + 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A stable 63-bit seed for one sample's views in one epoch (same on every machine/process)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def geometry_transform(image_size: int) -> v2.Compose:
    """PIL image (any size) → uint8 ``[3, S, S]``: random crop + flip (CPU stage)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                image_size,
                scale=(0.08, 1.0),
                interpolation=v2.InterpolationMode.BICUBIC,
                antialias=True,
            ),
            v2.RandomHorizontalFlip(p=0.5),
            v2.PILToTensor(),
        ]
    )


def appearance_transform(
    image_size: int,
    strength: float = 1.0,
    blur: bool | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    grayscale_prob: float = 0.2,
) -> v2.Compose:
    """uint8 ``[3, S, S]`` (any device) → normalized float32 ``[3, S, S]``: colour, gray, blur."""
    s = strength
    blur = image_size > 64 if blur is None else blur
    ops: list[v2.Transform] = []
    if s > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8))
    ops.append(v2.RandomGrayscale(p=grayscale_prob))
    if blur:
        ops.append(
            v2.RandomApply([v2.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=0.5)
        )
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


class SimCLRAugment:
    """Two independent random views of one image.

    Args:
        image_size: output side S.
        strength: colour-jitter strength s (1.0 for ImageNet, 0.5 usual for 32 px).
        blur: Gaussian blur on/off; ``None`` = on above 64 px (the paper drops it for CIFAR).
        appearance_on_cpu: ``False`` returns the uint8 geometry-only views, for a device-side
            appearance stage (see the module docstring).
    """

    def __init__(
        self,
        image_size: int,
        strength: float = 1.0,
        blur: bool | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        appearance_on_cpu: bool = True,
        grayscale_prob: float = 0.2,
    ) -> None:
        self.image_size = image_size
        self.geometry = geometry_transform(image_size)
        self.appearance = appearance_transform(
            image_size, strength, blur, mean, std, grayscale_prob
        )
        self.appearance_on_cpu = appearance_on_cpu

    def view(self, img: Image.Image) -> torch.Tensor:
        x = self.geometry(img)  # uint8 [3, S, S]
        return self.appearance(x) if self.appearance_on_cpu else x

    def __call__(
        self, img: Image.Image, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views ``([3, S, S], [3, S, S])``; with ``seed`` they are a pure function of it."""
        if seed is None:
            return self.view(img), self.view(img)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # Both views draw from one seeded stream one after the other, so they differ.
            return self.view(img), self.view(img)


def apply_per_sample(transform: v2.Transform, batch: torch.Tensor) -> torch.Tensor:
    """Apply a random transform with independent parameters per image: ``[N, 3, S, S]`` → same N.

    Works on any device (the device-side appearance stage); a v2 transform given the whole batch
    at once would share one draw of its parameters across all N images.
    """
    return torch.stack([transform(x) for x in batch])


def normalize_uint8(
    batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 ``[N, S, S, 3]`` → normalized float ``[N, 3, S, S]`` (what the ONNX graph does)."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)  # [N, 3, S, S] in [0, 1]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
