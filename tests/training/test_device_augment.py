"""The device-side appearance stage is the paper's recipe: each op equals torchvision's, the
parameters are drawn per image with the recipe's probabilities, and the whole stage matches the
workers' CPU path on the same parameters."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from simclr_embed.training.augment import blur_kernel_size
from simclr_embed.training.device_augment import (
    OPS,
    AppearanceParams,
    DeviceAppearance,
    gaussian_blur,
    resolve_augment_on,
    step_generator,
)

TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(n: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    """uint8 ``[n, 3, S, S]``: smooth colour fields, so hue and saturation have work to do."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        f = torch.rand(3, 2, generator=g) * 4
        ph = torch.rand(3, generator=g) * 6
        chans = [
            0.5 + 0.45 * torch.sin(6.28 * (f[c, 0] * xx + f[c, 1] * yy) + ph[c]) for c in range(3)
        ]
        out.append(torch.stack(chans))
    return (torch.stack(out) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("op", range(4), ids=["brightness", "contrast", "saturation", "hue"])
def test_each_op_equals_torchvision_image_by_image(op: int) -> None:
    x = _images(8).float() / 255
    factors = torch.linspace(-0.45, 0.45, 8) if op == 3 else torch.linspace(0.0, 1.9, 8)
    got = OPS[op](x.clone(), factors)
    want = torch.stack([TV_OPS[op](x[i], float(factors[i])) for i in range(8)])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)  # float32 rounding only


def test_blur_and_grayscale_equal_torchvision() -> None:
    x = _images(5, 48).float() / 255
    sigma = torch.tensor([0.1, 0.6, 1.0, 1.7, 2.0])
    k = blur_kernel_size(224)  # 23: the ImageNet kernel
    got = gaussian_blur(x, sigma, k)
    want = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2) for i in range(5)])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def _reference(img: torch.Tensor, p: AppearanceParams, i: int, k: int) -> torch.Tensor:
    """Image ``i`` through torchvision's functional ops with the same parameters, one by one, in
    the recipe's order. ``img`` uint8: the workers' path, which truncates to uint8 after every
    op; float: the same arithmetic as the device path."""
    x = img
    if p.jitter[i]:
        for op in p.order[i].tolist():
            x = TV_OPS[op](x, float(p.factors[i, op]))
    if p.gray[i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[i]:
        x = TF.gaussian_blur(x, [k, k], [float(p.sigma[i])] * 2)
    return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(MEAN), list(STD))


def test_whole_stage_matches_torchvision_and_the_workers_path() -> None:
    images = _images(48, 72)
    aug = DeviceAppearance(72, strength=1.0, blur=True, mean=MEAN, std=STD)
    params = aug.sample(48, step_generator(0, 7, 0))
    assert params.jitter.any() and params.gray.any() and params.blur.any()
    got = aug.apply(images, params)  # [48, 3, 72, 72]
    k = aug.kernel_size
    exact = torch.stack([_reference(images[i].float() / 255, params, i, k) for i in range(48)])
    # float32 rounding of up to six chained ops, in normalized units (÷ std ≈ 0.22): 3e-5 here
    # is 7e-6 in [0, 1], 1/500 of a uint8 step
    torch.testing.assert_close(got, exact, rtol=0, atol=3e-5)
    workers = torch.stack([_reference(images[i], params, i, k) for i in range(48)])
    # On uint8 images torchvision truncates to uint8 after each of up to six ops (a downward
    # bias of ~0.5/255 per op, scaled by the later ones): the two paths of the same recipe
    # differ by a few 1/255 (measured: mean 1.2/255, 99.9th percentile 4.2/255, max 6.3/255).
    diff = ((got - workers) * torch.tensor(STD).view(1, 3, 1, 1)).abs() * 255  # in 1/255 units
    assert diff.max() <= 8 and diff.mean() <= 2


def test_parameters_are_per_image_with_the_recipes_probabilities() -> None:
    aug = DeviceAppearance(224, strength=1.0, blur=True, grayscale_prob=0.2)
    batches = [aug.sample(250, step_generator(3, s, 0)) for s in range(80)]  # 20,000 images
    cat = {
        f: torch.cat([getattr(b, f) for b in batches]) for f in ("jitter", "gray", "blur", "sigma")
    }
    n = len(cat["jitter"])
    for name, p in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)):
        rate = cat[name].float().mean().item()
        # 5 standard errors (≈0.014-0.018): a wrong probability (0.7 for 0.8) cannot pass.
        assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5, (name, rate)
    factors = torch.cat([b.factors for b in batches])
    assert factors[:, :3].min() >= 0.2 - 1e-6 and factors[:, :3].max() <= 1.8 + 1e-6
    assert factors[:, 3].abs().max() <= 0.2 + 1e-6
    assert (
        abs(factors[:, :3].mean().item() - 1.0) < 0.01 and abs(factors[:, 3].mean().item()) < 0.005
    )
    assert cat["sigma"].min() >= 0.1 and cat["sigma"].max() <= 2.0
    # Every image its own order: all 24 permutations, each ≈ 1/24, inside every batch too.
    orders = torch.cat([b.order for b in batches])
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in orders.tolist():
        counts[tuple(row)] += 1
    freq = np.array(list(counts.values())) / n
    assert np.abs(freq - 1 / 24).max() < 5 * ((1 / 24) * (23 / 24) / n) ** 0.5
    assert len({tuple(r) for r in batches[0].order.tolist()}) > 12  # not one order per batch


def test_two_copies_of_one_image_get_different_views() -> None:
    image = _images(1, 48)
    batch = image.repeat(16, 1, 1, 1)
    views = DeviceAppearance(48, strength=1.0, blur=True)(batch, step_generator(0, 0, 0))
    distinct = {views[i].numpy().tobytes() for i in range(16)}
    assert len(distinct) >= 14  # only images drawn "nothing applied" twice may coincide


def test_the_same_step_draws_the_same_views_anywhere() -> None:
    aug = DeviceAppearance(32, strength=0.5)
    x = _images(8, 32)
    a, b = aug(x, step_generator(1, 5, 0)), aug(x, step_generator(1, 5, 0))
    assert torch.equal(a, b)  # what exact --resume needs
    assert not torch.equal(a, aug(x, step_generator(1, 6, 0)))
    assert not torch.equal(a, aug(x, step_generator(1, 5, 1)))  # ranks draw their own


def test_auto_is_device_on_cuda_only() -> None:
    assert resolve_augment_on("auto", torch.device("cpu")) == "workers"
    assert resolve_augment_on("auto", torch.device("cuda", 0)) == "device"
    assert resolve_augment_on("device", torch.device("cpu")) == "device"


@pytest.mark.slow
def test_both_paths_learn_alike_in_a_short_cpu_run(
    tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """60 steps on the bundled sample set (8 classes): untrained kNN 16.7 %; measured 35.4 %
    (workers) and 31.3 % (device). Both must learn, and about as much."""
    import re
    import subprocess
    import sys

    from simclr_embed.demo.sample_data import generate

    root = tmp_path_factory.mktemp("paths")
    generate(root / "data", per_class=24, size=32, seed=0)
    top1 = {}
    # Each run in a process of its own: a DataLoader worker forked from the long-lived,
    # multi-threaded test process once hung in OpenMP (fork after the parent used it).
    for mode in ("workers", "device"):
        argv = [
            "--data", str(root / "data"), "--out", str(root / mode), "--device", "cpu",
            "--arch", "resnet18", "--image-size", "32", "--stem", "standard",
            "--proj-dim", "32", "--batch-size", "32", "--max-steps", "60", "--lr", "1.0",
            "--temperature", "0.2", "--workers", "1", "--threads", "1", "--precision",
            "fp32", "--augment-on", mode, "--eval-data", str(root / "data"),
            "--eval-every", "1000", "--no-progress", "--log-every", "20",
        ]  # fmt: skip
        run = subprocess.run([sys.executable, "-m", "simclr_embed.training", *argv],
                             capture_output=True, text=True, timeout=240)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        top1[mode] = float(re.findall(r"kNN top-1 ([\d.]+)", run.stderr)[-1])
    assert min(top1.values()) >= 0.25, top1  # untrained: 0.167, chance 0.125
    assert abs(top1["workers"] - top1["device"]) <= 0.12, top1
