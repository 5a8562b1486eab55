"""Nearest-neighbour search at collection scale, and the near-duplicate threshold.

    .venv/bin/python bench/neighbors.py                        # 100,000 x 512, both parts
    .venv/bin/python bench/neighbors.py --n 20000 --model runs/demo/model.onnx --images DIR

Part 1 (synthetic, clustered like embeddings: 1,000 centres, non-negative like pooled ReLU
features): build time and queries/s of the exact index (IndexFlatIP) and the approximate one
(IndexHNSWFlat, simclr_embed.neighbors.search), beside numpy brute force (one matmul + argpartition per
chunk of queries), all on the same --queries rows of the collection, in one run; recall@10 of
HNSW against exact; and the all-vs-all time each implies for ``simclr neighbors`` (N queries).

Part 2 (with --model and --images, real photos): each of --originals pictures gets the four
planted near-copies of the test suite (JPEG quality 50, resized x0.5, 5 % crop, PNG copy);
all are embedded with the model (simclr_embed.embed.offline, the product's path); prints the cosine of
every copy to its original and of every original to its nearest *other* picture, and the
threshold that separates them — what ``--duplicates`` defaults to.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simclr_embed.imageio import list_images  # noqa: E402
from simclr_embed.neighbors.search import build_index, faiss_module, nearest, normalized, search  # noqa: E402


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="collection size [100000]")
    p.add_argument("--dim", type=int, default=512, help="vector dimension [512]")
    p.add_argument("--queries", type=int, default=2_000, help="timed queries [2000]")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--model", type=Path, default=None, help="part 2: an exported .onnx")
    p.add_argument("--images", type=Path, default=None, help="part 2: a folder of real photos")
    p.add_argument("--originals", type=int, default=400, help="part 2: pictures planted [400]")
    p.add_argument("--skip-index", action="store_true", help="part 2 only")
    return p.parse_args()


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.standard_normal((1000, dim))).astype(np.float32)
    x = centres[rng.integers(0, 1000, n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    return np.maximum(x, 0)


def numpy_top_k(unit: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = []
    for start in range(0, len(queries), 1024):
        sims = queries[start : start + 1024] @ unit.T  # [chunk, N]
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        out.append(np.take_along_axis(part, order, 1))
    return np.concatenate(out)


def part_one(args: argparse.Namespace) -> None:
    faiss = faiss_module()
    print(f"faiss {faiss.__version__}, {os.cpu_count()} CPUs, omp threads {faiss.omp_get_max_threads()}")  # fmt: skip
    unit = normalized(clustered(args.n, args.dim))
    picks = np.random.default_rng(1).choice(args.n, args.queries, replace=False)
    queries = unit[picks]
    rows = {}
    t0 = time.perf_counter()
    ref = numpy_top_k(unit, queries, args.k)
    rows["numpy brute force"] = (0.0, time.perf_counter() - t0, 1.0)
    results = {}
    for kind in ("exact", "hnsw"):
        t0 = time.perf_counter()
        index = build_index(unit, kind)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        results[kind] = search(index, queries, args.k).indices
        rows[f"faiss {kind}"] = (built, time.perf_counter() - t0, 0.0)
    recall = {}
    for kind, found in results.items():
        recall[kind] = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, ref, strict=True)])  # fmt: skip
    print(f"\n{args.n:,} x {args.dim}, {args.queries:,} queries, k = {args.k}")
    print(f"{'':20} {'build s':>8} {'queries/s':>10} {'recall@k':>9} {'all-vs-all est.':>16}")
    for name, (built, spent, _) in rows.items():
        qps = args.queries / spent
        kind = name.split()[-1]
        rec = recall.get(kind, 1.0)
        print(f"{name:20} {built:8.2f} {qps:10,.0f} {rec:9.4f} {built + args.n / qps:15.0f}s")


def plant(img: Image.Image, stem: str, out: Path) -> list[Path]:
    w, h = img.size
    dx, dy = max(1, int(0.025 * w)), max(1, int(0.025 * h))
    made = [out / f"{stem}.jpg", out / f"{stem}-q50.jpg", out / f"{stem}-half.png",
            out / f"{stem}-crop.png", out / f"{stem}-copy.png"]  # fmt: skip
    img.save(made[0], quality=90)
    img.save(made[1], quality=50)
    img.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR).save(made[2])
    img.crop((dx, dy, w - dx, h - dy)).save(made[3])
    buf = io.BytesIO(made[0].read_bytes())
    Image.open(buf).save(made[4])
    return made


def part_two(args: argparse.Namespace) -> None:
    from simclr_embed.embed.offline import OfflineEmbedder
    from simclr_embed.imageio import open_image

    photos = list_images(args.images)
    step = max(1, len(photos) // args.originals)
    picked = photos[::step][: args.originals]
    with tempfile.TemporaryDirectory() as tmp:
        files: list[Path] = []
        for i, path in enumerate(picked):
            files += plant(open_image(path), f"o{i:05d}", Path(tmp))
        with OfflineEmbedder(args.model, device="cpu") as engine:
            vectors = np.concatenate([b.vectors for b in engine.embed_iter(map(str, files))])
    assert len(vectors) == len(files), "some planted files could not be embedded"
    unit = normalized(vectors).reshape(len(picked), 5, -1)  # [originals, 5 versions, D]
    copies = np.einsum("od,ovd->ov", unit[:, 0], unit[:, 1:])  # [originals, 4]
    found = nearest(unit[:, 0], 1, index="exact")  # originals only: nearest other picture
    distinct = found.similarities[:, 0]
    print(
        f"\n{len(picked)} real photos from {args.images} + 4 near-copies each, model {args.model}"
    )
    for v, name in enumerate(("JPEG q50", "resize x0.5", "5 % crop", "PNG copy")):
        c = copies[:, v]
        print(f"  copy {name:12} cosine to original: min {c.min():.4f}  p1 {np.quantile(c, 0.01):.4f}  median {np.median(c):.4f}")  # fmt: skip
    print(f"  nearest other picture:             max {distinct.max():.4f}  p99 {np.quantile(distinct, 0.99):.4f}  median {np.median(distinct):.4f}")  # fmt: skip
    print("\n| threshold | q50 found | x0.5 found | crop found | PNG found | all copies | originals paired with another picture |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for t in np.round(np.arange(0.90, 1.0, 0.01), 2):
        found = " | ".join(f"{np.mean(copies[:, v] >= t):.3f}" for v in range(4))
        print(f"| {t:.2f} | {found} | {np.mean(copies >= t):.3f} | {np.mean(distinct >= t):.3f} |")


def main() -> int:
    args = get_args()
    if not args.skip_index:
        part_one(args)
    if args.model is not None and args.images is not None:
        part_two(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
