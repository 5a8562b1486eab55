"""The bundled sample dataset: small synthetic images whose class is a *shape*, nothing else.

``python -m simclr_embed.sample_data OUT [--per-class N] [--size S] [--seed K]`` writes
``OUT/<class>/<class>-<i>.png``. Nothing is downloaded and nothing is committed: the images are
drawn with numpy + Pillow from a seed, so every machine gets byte-identical files (the demo
generates them into ``runs/demo/data``).

Why this set: the class is the shape (circle, ring, triangle, square, star, cross, stripes,
checker), while everything SimCLR's augmentations make a network invariant to varies at random
per image — foreground and background colour, position, scale, rotation, background texture,
pixel noise. An untrained network's features are dominated by colour and layout, so its
nearest neighbours mostly disagree on the class; a few minutes of contrastive training with
colour jitter, grayscale and crops teaches it to ignore those and the kNN agreement jumps.
The labels (folder names) are for the demo's report only: training ignores subfolders.

Image ``i`` of a class depends only on (seed, class, i), so ``--per-class`` may grow without
changing the images already there.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from simclr_embed.errors import SimclrError
from simclr_embed.fileio import atomic_path

log = logging.getLogger(__name__)

CLASSES = ("circle", "ring", "triangle", "square", "star", "cross", "stripes", "checker")
SUPERSAMPLE = 4  # draw at 4× and downsample: anti-aliased edges without a vector renderer


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float64)


def _contrasting_colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground/background colours far enough apart that the shape stays visible."""
    bg = _random_color(rng)
    for _ in range(100):
        fg = _random_color(rng)
        if np.linalg.norm(fg - bg) > 120:
            return fg, bg
    return 255.0 - bg, bg


def _background(rng: np.random.Generator, size: int, bg: np.ndarray) -> np.ndarray:
    """[S, S, 3] float background: flat, a linear gradient, or smooth blotchy noise."""
    kind = rng.integers(0, 3)
    base = np.broadcast_to(bg, (size, size, 3)).astype(np.float64)
    if kind == 1:  # gradient towards a second, nearby colour
        other = np.clip(bg + rng.normal(0, 50, 3), 0, 255)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        return base * (1 - t[..., None]) + other * t[..., None]
    if kind == 2:  # low-frequency noise: a coarse random grid upsampled bicubically
        cells = int(rng.integers(3, 7))
        grid = rng.normal(0, 25, (cells, cells, 3)).astype(np.float32)
        layers = [
            np.asarray(
                Image.fromarray(grid[..., c], mode="F").resize(
                    (size, size), Image.Resampling.BICUBIC
                )
            )
            for c in range(3)
        ]
        return base + np.stack(layers, axis=-1)
    return base


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _star(n: int, inner: float) -> np.ndarray:
    """Unit star polygon with ``n`` spikes; [2n, 2]."""
    t = np.arange(2 * n) * math.pi / n - math.pi / 2
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """An 'L' mask at SUPERSAMPLE× the size: 255 where the foreground colour goes."""
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(mask)
    angle = rng.uniform(0, 2 * math.pi)
    if kind in ("stripes", "checker"):
        # Textures fill the frame: the period, phase and orientation vary, the pattern does not.
        period = big * rng.uniform(0.14, 0.3)
        yy, xx = np.mgrid[0:big, 0:big].astype(np.float64) - big / 2
        u = math.cos(angle) * xx + math.sin(angle) * yy + rng.uniform(0, period)
        v = -math.sin(angle) * xx + math.cos(angle) * yy + rng.uniform(0, period)
        on = np.floor(u / period) % 2 == 0
        if kind == "checker":
            on ^= np.floor(v / period) % 2 == 0
        return Image.fromarray(np.where(on, 255, 0).astype(np.uint8), mode="L")
    radius = big * rng.uniform(0.22, 0.4)
    # Keep the whole shape inside the frame: the centre moves within what the radius leaves.
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, big - margin, 2)
    if kind == "circle":
        d.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        return mask
    if kind == "ring":
        d.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        r2 = radius * rng.uniform(0.5, 0.7)
        d.ellipse((cx - r2, cy - r2, cx + r2, cy + r2), fill=0)
        return mask
    if kind == "triangle":
        unit = _star(3, 1.0)[::2]
    elif kind == "square":
        unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.75
    elif kind == "star":
        unit = _star(5, rng.uniform(0.38, 0.5))
    elif kind == "cross":
        a, b = 1.0, rng.uniform(0.28, 0.38)
        unit = np.array(
            [
                [-b, -a],
                [b, -a],
                [b, -b],
                [a, -b],
                [a, b],
                [b, b],
                [b, a],
                [-b, a],
                [-b, b],
                [-a, b],
                [-a, -b],
                [-b, -b],
            ]
        )
    else:
        raise ValueError(f"unknown class {kind!r}")
    pts = _rotate(unit, angle) * radius + np.array([cx, cy])
    d.polygon([tuple(p) for p in pts], fill=255)
    return mask


def draw(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB ``size``×``size`` image of class ``kind``; every nuisance factor comes from ``rng``."""
    fg, bg = _contrasting_colors(rng)
    background = _background(rng, size, bg)  # [S, S, 3]
    mask = _shape_mask(kind, size, rng).resize((size, size), Image.Resampling.BOX)
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255.0  # [S, S, 1]
    # The foreground gets a slight shading too, so no class is a perfectly flat colour.
    shade = 1.0 + rng.uniform(-0.15, 0.15) * (np.linspace(-1, 1, size)[None, :, None])
    img = background * (1 - alpha) + np.clip(fg * shade, 0, 255) * alpha
    img += rng.normal(0, rng.uniform(2, 12), img.shape)  # sensor-like pixel noise
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
        prog="python -m simclr_embed.sample_data",
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
    from simclr_embed.cli import run_main

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(run_main(main))
