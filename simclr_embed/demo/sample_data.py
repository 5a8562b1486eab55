"""The bundled sample dataset: small synthetic images whose class is a *pattern*, nothing else.

``python -m simclr_embed.demo.sample_data OUT [--per-class N] [--size S] [--seed K]`` writes
``OUT/<class>/<class>-<i>.png``. Nothing is downloaded and nothing is committed: the images are
drawn with numpy + Pillow from a seed, so every machine gets byte-identical files (the demo
generates them into ``runs/demo/data``).

Why this set: the class is a pattern that fills the frame — five periodic textures (stripes,
checker, waves, grid, dots) and three kinds of scattered small shapes (triangles, crosses,
rings) — so any crop SimCLR takes still shows it, while everything its augmentations make a
network invariant to varies at random per image: hue, saturation and which of the two
lightnesses is the foreground, the pattern's period, phase and slight tilt, the shapes' places
and rotations, a background gradient, pixel noise, blur. An untrained network's features are
dominated by colour and layout, so its nearest neighbours often disagree on the class; a few
minutes of contrastive training with colour jitter, grayscale and crops teaches it to ignore
those, and the kNN agreement jumps (measured numbers in ``_contrasting_colors``).
The labels (folder names) are for the demo's report only: training ignores subfolders.

Image ``i`` of a class depends only on (seed, class, i), so ``--per-class`` may grow without
changing the images already there.
"""

from __future__ import annotations

import argparse
import colorsys
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_path

log = logging.getLogger(__name__)

CLASSES = ("stripes", "checker", "waves", "grid", "dots", "triangles", "crosses", "rings")
SCATTERED = ("triangles", "crosses", "rings")
SUPERSAMPLE = 4  # draw at 4× and downsample: anti-aliased edges without a vector renderer
# Pattern scale, as fractions of the image side: coarse enough that the pattern survives the
# trip to the demo's 32 px training size (a 0.1 period aliases into mush there; measured below).
PERIOD = (0.13, 0.17)  # texture period
SCATTER_RADIUS = (0.07, 0.09)  # scattered shapes: radius
SCATTER_COUNT = (12, 20)  # scattered shapes: how many (high exclusive)


def _contrasting_colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground/background RGB: one random hue and saturation, two lightnesses far apart.

    One hue per image, not two free colours: a pair of unrelated colours is a fingerprint that
    survives SimCLR's colour jitter (a hue shift moves both colours alike, keeping their
    relation), so the contrastive task would be solved by colour and nothing about the pattern
    learned. With a single hue the jitter and grayscale erase the colour cue, and the pattern is
    what is left to tell images apart. (Measured with the demo's recipe, 200 steps, 8 classes:
    two palette colours gave 33% kNN agreement against 28% untrained; one hue gave 48% against
    36% at a 0.2 period and 68% against 37% at this scale, 300 steps.)
    """
    hue, sat = rng.uniform(), rng.uniform(0.4, 1.0)
    dark, light = sorted(rng.uniform(0.15, 0.9, 2))
    if light - dark < 0.35:  # keep the pattern visible
        dark, light = max(0.1, dark - 0.2), min(0.95, light + 0.2)
    a, b = (np.array(colorsys.hls_to_rgb(hue, v, sat)) * 255.0 for v in (dark, light))
    return (a, b) if rng.random() < 0.5 else (b, a)


def _background(rng: np.random.Generator, size: int, bg: np.ndarray) -> np.ndarray:
    """[S, S, 3] float background: flat, or a linear gradient towards a nearby colour."""
    kind = rng.integers(0, 2)
    base = np.broadcast_to(bg, (size, size, 3)).astype(np.float64)
    if kind == 1:  # gradient towards a second, nearby colour
        other = np.clip(bg + rng.normal(0, 50, 3), 0, 255)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        return base * (1 - t[..., None]) + other * t[..., None]
    return base


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _star(n: int, inner: float) -> np.ndarray:
    """Unit star polygon with ``n`` spikes; [2n, 2]."""
    t = np.arange(2 * n) * math.pi / n - math.pi / 2
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _unit_polygon(kind: str) -> np.ndarray:
    """[K, 2] outline of a shape inside the unit circle."""
    if kind == "triangles":
        return _star(3, 1.0)[::2]
    if kind == "crosses":
        a, b = 1.0, 0.34
        return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a],
                         [-b, b], [-a, b], [-a, -b], [-b, -b]])  # fmt: skip
    raise ValueError(kind)


def _texture(kind: str, big: int, rng: np.random.Generator) -> np.ndarray:
    """Bool [B, B] mask of a periodic pattern at a random period, phase and orientation."""
    period = big * rng.uniform(*PERIOD)
    angle = math.radians(rng.uniform(-5, 5))  # near-vertical: rotation is not augmented
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float64) - big / 2
    u = math.cos(angle) * xx + math.sin(angle) * yy + rng.uniform(0, period)  # along the pattern
    v = -math.sin(angle) * xx + math.cos(angle) * yy + rng.uniform(0, period)
    if kind == "stripes":
        return np.floor(u / period) % 2 == 0
    if kind == "checker":
        return (np.floor(u / period) % 2 == 0) ^ (np.floor(v / period) % 2 == 0)
    if kind == "waves":  # stripes bent into a sine: same bands, curved
        bend = period * rng.uniform(0.5, 0.9) * np.sin(2 * math.pi * v / (period * 3))
        return np.floor((u + bend) / period) % 2 == 0
    if kind == "grid":  # thin lines both ways
        width = period * rng.uniform(0.18, 0.3)
        return ((u % period) < width) | ((v % period) < width)
    if kind == "dots":  # a regular lattice of discs
        r = period * rng.uniform(0.25, 0.35)
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        return du * du + dv * dv < r * r
    raise ValueError(f"unknown class {kind!r}")


def _scatter(kind: str, big: int, rng: np.random.Generator) -> np.ndarray:
    """Bool [B, B] mask: SCATTER_COUNT copies of a shape at random places, sizes, rotations."""
    mask = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(*SCATTER_COUNT))):
        radius = big * rng.uniform(*SCATTER_RADIUS)
        cx, cy = rng.uniform(0, big, 2)
        if kind == "rings":
            d.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=255,
                      width=max(1, round(radius * 0.35)))  # fmt: skip
            continue
        pts = _rotate(_unit_polygon(kind), rng.uniform(0, 2 * math.pi)) * radius + (cx, cy)
        d.polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(mask) > 127


def _pattern_mask(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """An 'L' mask at SUPERSAMPLE× the size: 255 where the foreground colour goes.

    Every class fills the whole frame, so any crop of an image (SimCLR's RandomResizedCrop keeps
    as little as 8% of it) still shows its class: periodic textures (stripes, checker, waves,
    grid, dots) or scattered small shapes (triangles, crosses, rings).
    """
    big = size * SUPERSAMPLE
    on = _scatter(kind, big, rng) if kind in SCATTERED else _texture(kind, big, rng)
    return Image.fromarray(np.where(on, 255, 0).astype(np.uint8), mode="L")


def draw(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB ``size``×``size`` image of class ``kind``; every nuisance factor comes from ``rng``."""
    fg, bg = _contrasting_colors(rng)
    background = _background(rng, size, bg)  # [S, S, 3]
    mask = _pattern_mask(kind, size, rng).resize((size, size), Image.Resampling.BOX)
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255.0  # [S, S, 1]
    # The foreground gets a slight shading too, so no class is a perfectly flat colour.
    shade = 1.0 + rng.uniform(-0.15, 0.15) * (np.linspace(-1, 1, size)[None, :, None])
    img = background * (1 - alpha) + np.clip(fg * shade, 0, 255) * alpha
    img += rng.normal(0, rng.uniform(2, 6), img.shape)  # sensor-like pixel noise
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return out


def generate(
    out: str | Path,
    *,
    per_class: int = 100,
    size: int = 64,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
) -> list[Path]:
    """Write ``out/<class>/<class>-<i>.png``; returns the paths in (class, i) order.

    Idempotent (a rerun rewrites the same bytes); each write is atomic, so an interrupted run
    never leaves a truncated PNG behind.
    """
    if per_class < 1:
        raise SimclrError(f"--per-class must be >= 1, got {per_class}")
    if size < 16:
        raise SimclrError(f"--size must be >= 16, got {size}")
    out = Path(out)
    paths: list[Path] = []
    for ci, kind in enumerate(classes):
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            # The image depends on (seed, class, i) only.
            rng = np.random.default_rng([seed, ci, i])
            path = folder / f"{kind}-{i:04d}.png"
            img = draw(kind, size, rng)
            with atomic_path(path) as tmp:
                img.save(tmp, format="PNG")
            paths.append(path)
    log.info("wrote %d images (%d classes × %d) to %s", len(paths), len(classes), per_class, out)
    return paths


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simclr_embed.demo.sample_data",
        description="Generate the synthetic labeled sample dataset (OUT/<class>/*.png).",
    )
    p.add_argument("out", type=Path, help="output folder (created)")
    p.add_argument("--per-class", type=int, default=100, help="images per class [100]")
    p.add_argument("--size", type=int, default=64, help="image side in pixels [64]")
    p.add_argument("--seed", type=int, default=0, help="seed; same seed → same files [0]")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    paths = generate(args.out, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"wrote {len(paths)} images in {len(CLASSES)} classes to {args.out}")
    return 0


if __name__ == "__main__":
    from simclr_embed.errors import run_main

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(run_main(main))
