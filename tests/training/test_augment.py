"""SimCLR augmentations: shapes/dtypes, two different views, seeded determinism, blur by size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from simclr_embed.imageio import IMAGENET_MEAN, IMAGENET_STD
from simclr_embed.training.augment import (
    SimCLRAugment,
    appearance_transform,
    apply_per_sample,
    blur_kernel_size,
    sample_seed,
)


def _photo(size: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size + 10, 3), dtype=np.uint8))


def _has(t: v2.Compose, kind: type) -> bool:
    def walk(ts: list) -> bool:
        for x in ts:
            if isinstance(x, kind) or (isinstance(x, v2.RandomApply) and walk(list(x.transforms))):
                return True
        return False

    return walk(list(t.transforms))


@pytest.mark.parametrize("size", [32, 72])
def test_views_shape_dtype_and_normalization(size: int) -> None:
    v1, v2_ = SimCLRAugment(size, strength=0.5)(_photo(), seed=1)
    for v in (v1, v2_):
        assert v.shape == (3, size, size) and v.dtype == torch.float32
        assert torch.isfinite(v).all()
    # Normalized with ImageNet stats: a [0, 1] pixel maps into [-mean/std, (1-mean)/std].
    lo = min(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    assert lo - 1e-4 <= v1.min() and v1.max() <= hi + 1e-4


def test_geometry_only_views_are_uint8() -> None:
    v1, _ = SimCLRAugment(32, appearance_on_cpu=False)(_photo(), seed=0)
    assert v1.dtype == torch.uint8 and v1.shape == (3, 32, 32)


def test_two_views_differ_and_seed_determines_them() -> None:
    aug = SimCLRAugment(32, strength=1.0)
    img = _photo()
    a1, a2 = aug(img, seed=123)
    b1, b2 = aug(img, seed=123)
    c1, _ = aug(img, seed=124)
    assert not torch.equal(a1, a2)  # independent draws for the two views
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # same seed → same views
    assert not torch.equal(a1, c1)


def test_seeded_views_leave_global_rng_untouched() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    SimCLRAugment(32)(_photo(), seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_sample_seed_is_stable_and_distinct() -> None:
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    seeds = {sample_seed(s, e, i) for s in range(2) for e in range(3) for i in range(50)}
    assert len(seeds) == 2 * 3 * 50
    assert all(0 <= s < 2**63 for s in seeds)


def test_blur_on_above_64px_only_and_kernel_is_ten_percent() -> None:
    assert not _has(appearance_transform(32), v2.GaussianBlur)
    assert not _has(appearance_transform(64), v2.GaussianBlur)
    assert _has(appearance_transform(96), v2.GaussianBlur)
    assert _has(appearance_transform(32, blur=True), v2.GaussianBlur)
    assert not _has(appearance_transform(224, blur=False), v2.GaussianBlur)
    assert blur_kernel_size(224) == 23 and blur_kernel_size(96) == 11 and blur_kernel_size(20) == 3
    blur = next(
        t
        for r in appearance_transform(224).transforms
        if isinstance(r, v2.RandomApply)
        for t in r.transforms
        if isinstance(t, v2.GaussianBlur)
    )
    assert list(blur.sigma) == [0.1, 2.0]


def test_colour_jitter_follows_strength() -> None:
    jitter = next(
        t
        for r in appearance_transform(32, strength=0.5).transforms
        if isinstance(r, v2.RandomApply)
        for t in r.transforms
        if isinstance(t, v2.ColorJitter)
    )
    assert jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4)
    assert jitter.saturation == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)


def test_grayscale_fraction_close_to_paper() -> None:
    """p(gray) = 0.2: count views whose channels are equal, over many seeds (independent check)."""
    aug = SimCLRAugment(16, strength=0.0, blur=False, mean=(0, 0, 0), std=(1, 1, 1))
    img = _photo(24)
    gray = 0
    for s in range(300):
        v, _ = aug(img, seed=s)
        gray += int(torch.allclose(v[0], v[1]) and torch.allclose(v[1], v[2]))
    assert 0.12 < gray / 300 < 0.28


def test_apply_per_sample_draws_parameters_per_image() -> None:
    x = SimCLRAugment(32, appearance_on_cpu=False)(_photo(), seed=0)[0]  # uint8 [3, 32, 32]
    batch = x.expand(8, -1, -1, -1).clone()  # 8 identical crops
    torch.manual_seed(0)
    out = apply_per_sample(appearance_transform(32), batch)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    assert len({tuple(o.flatten()[:64].tolist()) for o in out}) > 1
