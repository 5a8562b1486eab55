"""SimCLR's appearance stage on a whole batch on the training device, per-sample random.

``--augment-on device``: DataLoader workers only decode and crop (uint8 ``[3, S, S]``, 4× less
host→device traffic than float); this module then turns the uint8 ``[N, 3, S, S]`` batch into
normalized float views with the paper's recipe, every image with its own random parameters:

    colour jitter (p 0.8): brightness, contrast, saturation (factors U[max(0, 1-0.8s), 1+0.8s])
        and hue (U[-0.2s, 0.2s]) in a random order of its own;
    grayscale (p 0.2 by default); Gaussian blur (p 0.5, σ ∈ U[0.1, 2], kernel ≈ 10 % of S;
        off at ≤ 64 px); then scale to [0, 1] and normalize with the training mean/std.

Each op is torchvision's formula on float images (hue: its HSV → RGB in closed form) (``torchvision.transforms.v2.functional``:
``adjust_brightness/contrast/saturation/hue``, ``rgb_to_grayscale``, ``gaussian_blur`` with
reflect padding); tests compare them image by image. The workers' CPU path applies the same ops
to uint8 images, rounding after each, so the two differ by ≤ a few 1/255 per pixel.

Why not kornia.augmentation: its ``ColorJitter`` draws ONE order of the four colour ops for the
whole batch (``randperm(4)`` per call), and the recipe (torchvision's ``ColorJitter``) draws one
per image; measured beside this module in ``bench/augment.py``.

Parameters are drawn on the host from a ``torch.Generator`` seeded by (seed, step, rank) —
a handful of numbers per image — and only the per-image factors and index lists travel to the
device: no random draw and no data-dependent sync happen there, and a resumed run draws exactly
the views the uninterrupted one did. The per-image colour order is applied as 4 slots × 4 ops,
each op on the index list of the images that have it in that slot, so every image pays for each
op once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from simclr_embed.training.augment import blur_kernel_size

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass
class AppearanceParams:
    """Per-image parameters of one batch (CPU tensors): ``[N]`` unless noted."""

    jitter: torch.Tensor  # bool: colour jitter applied
    factors: torch.Tensor  # [N, 4] float: brightness, contrast, saturation, hue
    order: torch.Tensor  # [N, 4] long: the order of the four ops (a permutation of 0..3)
    gray: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # float: blur σ


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The host generator for one step's parameters: a pure function of (seed, step, rank)."""
    digest = hashlib.blake2b(f"device-aug:{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """``[n, 3, H, W]`` → ``[n, 1, H, W]`` luma, as ``TF.rgb_to_grayscale``."""
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # [n, 1, 1, 1]
    return _blend(x, mean, f.view(-1, 1, 1, 1))


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _grayscale(x), f.view(-1, 1, 1, 1))


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Shift the hue by ``f`` ``[n]`` turns: RGB → HSV → RGB, as ``TF.adjust_hue``."""
    r, g, b = x.unbind(1)  # [n, H, W] each
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    # HSV → RGB in closed form: channel c = v - v·s·clamp(min(k, 4 - k), 0, 1) with
    # k = (n_c + 6h) mod 6, n = 5, 3, 1 for R, G, B — the same values as torchvision's six-case
    # table (≤ 2e-6, tested) without building the [n, 3, 6, H, W] stack it selects from: ~3×
    # faster on the CPU.
    h6 = torch.remainder(h + f.view(-1, 1, 1), 1.0) * 6.0  # [n, H, W]
    vs = maxc * s
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(maxc - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, dim=1)


OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-image σ ``[n]``; separable, reflect padding, as ``TF.gaussian_blur``."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) * 0.5
    pos = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    pdf = torch.exp(-0.5 * (pos.view(1, -1) / sigma.view(-1, 1)) ** 2)  # [n, k]
    kernel = (pdf / pdf.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [n·c, k]
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


class DeviceAppearance:
    """uint8 ``[N, 3, S, S]`` (any device) → normalized float32 views, per-image random.

    Args mirror ``simclr_embed.training.augment.appearance_transform``.
    """

    def __init__(
        self,
        image_size: int,
        strength: float = 1.0,
        blur: bool | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        grayscale_prob: float = 0.2,
    ) -> None:
        self.strength = strength
        self.blur = image_size > 64 if blur is None else blur
        self.kernel_size = blur_kernel_size(image_size)
        self.grayscale_prob = grayscale_prob
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def sample(self, n: int, generator: torch.Generator) -> AppearanceParams:
        """Independent parameters for ``n`` images, on the host."""
        s = self.strength

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator)

        b = c = sat = 0.8 * s
        factors = torch.stack(
            [
                uniform(max(0.0, 1 - b), 1 + b),
                uniform(max(0.0, 1 - c), 1 + c),
                uniform(max(0.0, 1 - sat), 1 + sat),
                uniform(-0.2 * s, 0.2 * s),
            ],
            dim=1,
        )  # [n, 4]
        order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)  # [n, 4] permutations
        return AppearanceParams(
            jitter=(torch.rand(n, generator=generator) < 0.8) & (s > 0),
            factors=factors,
            order=order,
            gray=torch.rand(n, generator=generator) < self.grayscale_prob,
            blur=(torch.rand(n, generator=generator) < 0.5) & self.blur,
            sigma=uniform(0.1, 2.0),
        )

    def apply(self, images: torch.Tensor, p: AppearanceParams) -> torch.Tensor:
        """uint8 ``[N, 3, S, S]`` → float32 normalized ``[N, 3, S, S]`` on the same device."""
        dev = images.device
        x = images.float().div_(255.0)  # [N, 3, S, S] in [0, 1]
        factors = p.factors.to(dev, non_blocking=True)
        for slot in range(4):
            for op in range(4):
                idx = torch.nonzero(p.jitter & (p.order[:, slot] == op)).squeeze(1)  # host
                if len(idx):
                    idx = idx.to(dev, non_blocking=True)
                    x[idx] = OPS[op](x[idx], factors[idx, op])
        gray = torch.nonzero(p.gray).squeeze(1)
        if len(gray):
            gray = gray.to(dev, non_blocking=True)
            x[gray] = _grayscale(x[gray]).expand(-1, 3, -1, -1)
        blurred = torch.nonzero(p.blur).squeeze(1)
        if len(blurred):
            sigma = p.sigma[blurred].to(dev, non_blocking=True)
            blurred = blurred.to(dev, non_blocking=True)
            x[blurred] = gaussian_blur(x[blurred], sigma, self.kernel_size)
        return (x - self.mean.to(dev)) / self.std.to(dev)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.sample(len(images), generator))


def resolve_augment_on(choice: str, device: torch.device) -> str:
    """``auto`` → ``device`` when training on CUDA (workers feed the GPU less), ``workers`` on
    the CPU (the workers run beside the model there; measured in bench/augment.py)."""
    if choice == "auto":
        return "device" if device.type == "cuda" else "workers"
    if choice not in ("workers", "device"):
        raise ValueError(f"augment_on must be auto, workers or device, got {choice!r}")
    return choice
