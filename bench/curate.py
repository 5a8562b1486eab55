"""``simclr curate`` on real photos with planted problems: how well does it find them?
(results: docs/benchmarks.md "Curate")

    .venv/bin/python bench/curate.py --checkpoint runs/quality/cpu-quick/last.pt

The collection: ``--n`` CIFAR-10 photos (``../shared/data``), plus
- 40 byte copies (exact duplicates),
- near copies of 40 others, five kinds each: JPEG q50, ×0.5 resize, 5 % crop, PNG, and crop +
  ×0.75 + q50 combined,
- 80 foreign images: noise, rendered text, solid colours, line drawings (another domain).
Embedded by ``simclr embed`` with the trained checkpoint's ONNX export and with an untrained
twin; then ``simclr curate --model`` (calibrated threshold) and ``--duplicates 0.98`` (the fixed
default). Reported: exact-duplicate recall/precision, near-copy recall by kind, groups mixing two
different source photos, outlier AUROC for the foreign images.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
TARBALL = ROOT.parent / "shared" / "data" / "cifar10-small.tar.gz"
EDITS = ("q50", "half", "crop", "png", "combined")


def plant(photos: list[Path], data: Path, rng: np.random.Generator) -> dict[str, str]:
    """Copy the photos into ``data`` with planted problems; returns file → its source photo
    (each foreign image to ``foreign:NAME``)."""
    source: dict[str, str] = {}
    (data / "photos").mkdir(parents=True)
    for p in photos:
        dest = data / "photos" / f"{p.parent.name}-{p.name}"
        shutil.copy(p, dest)
        source[str(dest)] = dest.stem
    originals = list(source)
    picks = rng.choice(len(originals), 80, replace=False)
    (data / "copies").mkdir()
    for i in picks[:40]:
        dest = data / "copies" / Path(originals[i]).name
        shutil.copy(originals[i], dest)
        source[str(dest)] = source[originals[i]]
    (data / "near").mkdir()
    for i in picks[40:]:
        img = Image.open(originals[i]).convert("RGB")
        w, h = img.size
        stem = Path(originals[i]).stem
        crop = img.crop(
            (round(0.025 * w), round(0.025 * h), w - round(0.025 * w), h - round(0.025 * h))
        )
        made = {
            "q50": (img, "jpg", {"quality": 50}),
            "half": (img.resize((max(8, w // 2), max(8, h // 2))), "jpg", {"quality": 90}),
            "crop": (crop, "jpg", {"quality": 90}),
            "png": (img, "png", {}),
            "combined": (crop.resize((round(crop.width * 0.75), round(crop.height * 0.75))), "jpg", {"quality": 50}),
        }  # fmt: skip
        for edit, (im, ext, kw) in made.items():
            dest = data / "near" / f"{stem}-{edit}.{ext}"
            im.save(dest, **kw)
            source[str(dest)] = source[originals[i]]
    (data / "foreign").mkdir()
    for k in range(80):
        kind = ("noise", "text", "solid", "drawing")[k % 4]
        img = Image.new("RGB", (32, 32), tuple(int(c) for c in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(img)
        if kind == "noise":
            img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8))
        elif kind == "text":
            img = Image.new("RGB", (32, 32), "white")
            ImageDraw.Draw(img).text((1, 10), f"ab{k}", fill="black")
        elif kind == "drawing":
            img = Image.new("RGB", (32, 32), "white")
            d = ImageDraw.Draw(img)
            for _ in range(3):
                x0, y0, x1, y1 = rng.integers(0, 32, 4)
                d.line((int(x0), int(y0), int(x1), int(y1)), fill="black", width=2)
        dest = data / "foreign" / f"{kind}-{k}.png"
        img.save(dest)
        source[str(dest)] = f"foreign:{dest.name}"  # each foreign image is its own source
    return source


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive outranks a negative (Mann-Whitney, ties half)."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def score(cur: Path, source: dict[str, str]) -> dict[str, object]:
    def tsv(name: str) -> list[list[str]]:
        return [ln.split("\t") for ln in (cur / name).read_text().splitlines()[1:]]

    exact: dict[str, set[str]] = defaultdict(set)
    for g, path in tsv("exact_duplicates.tsv"):
        exact[g].add(path)
    planted_exact = {p for p in source if "/copies/" in p}
    found_pairs = {p for grp in exact.values() for p in grp if "/copies/" in p}
    pure = sum(len({source[p] for p in grp}) == 1 for grp in exact.values())
    near: dict[str, set[str]] = defaultdict(set)
    for g, path, _ in tsv("duplicates.tsv"):
        near[g].add(path)
    group_of = {p: g for g, grp in near.items() for p in grp}
    recall = {}
    for edit in EDITS:
        copies = [p for p in source if "/near/" in p and Path(p).stem.endswith("-" + edit)]
        hits = 0
        for c in copies:
            original = next(p for p in source if "/photos/" in p and source[p] == source[c])
            hits += c in group_of and group_of.get(original) == group_of[c]
        recall[edit] = hits / len(copies)
    mixed = sum(len({source[p] for p in grp}) > 1 for grp in near.values())
    outl = tsv("outliers.tsv")
    scores = np.array([float(s) for _, s in outl])
    foreign = np.array([source[p].startswith("foreign:") for p, _ in outl])
    return {
        "exact_recall": len(found_pairs & planted_exact) / len(planted_exact),
        "exact_precision": pure / max(1, len(exact)),
        "near_recall": recall,
        "near_groups": len(near),
        "mixed_groups": mixed,
        "outlier_auroc": auroc(scores, foreign),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="a trained simclr train checkpoint"
    )
    p.add_argument("--n", type=int, default=2000, help="CIFAR photos in the collection [2000]")
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from quality import write_untrained

    from simclr_embed.export.onnx_export import export_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="simclr-curate-bench-"))
    with tarfile.open(TARBALL) as tar:
        tar.extractall(work, filter="data")
    rng = np.random.default_rng(0)
    photos = sorted((work / "cifar10-small" / "train").rglob("*.jpg"))
    photos = [photos[i] for i in sorted(rng.choice(len(photos), args.n, replace=False))]
    source = plant(photos, work / "data", rng)
    print(f"collection: {len(source)} files ({args.n} photos + planted), {work / 'data'}")
    untrained = work / "untrained.pt"
    write_untrained(args.checkpoint, untrained, 0)
    print("| model | threshold | exact recall / precision | near recall: " + " / ".join(EDITS)
          + " | groups | mixed groups | outlier AUROC |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for name, ckpt in (("trained", args.checkpoint), ("untrained", untrained)):
        onnx = work / f"{name}.onnx"
        export_checkpoint(ckpt, onnx, verify=False)
        emb = work / f"{name}.npy"
        subprocess.run([sys.executable, "-m", "simclr_embed.cli", "embed", "--model", str(onnx), "--output", str(emb),
                        "--no-progress", "--overwrite", str(work / "data")], check=True)  # fmt: skip
        for how, flags in (
            ("calibrated", ["--model", str(onnx)]),
            ("calibrated, --outlier-score mean", ["--model", str(onnx), "--outlier-score", "mean"]),
            ("0.98 (fixed)", ["--duplicates", "0.98"]),
        ):
            cur = work / f"{name}-{how.split()[0].rstrip(',')}-{len(flags)}"
            run = subprocess.run([sys.executable, "-m", "simclr_embed.curate", "--embeddings", str(emb),
                                  "--output", str(cur), "--overwrite", *flags],
                                 check=True, capture_output=True, text=True)  # fmt: skip
            line = next(
                (ln for ln in run.stdout.splitlines() if ln.startswith("near-duplicate threshold")),
                how,
            )
            s = score(cur, source)
            recall = " / ".join(f"{v:.0%}" for v in s["near_recall"].values())  # type: ignore[union-attr]
            print(f"| {name} | {how}: {line.split()[3] if line != how else ''} | "
                  f"{s['exact_recall']:.2f} / {s['exact_precision']:.2f} | {recall} | {s['near_groups']} | "
                  f"{s['mixed_groups']} | {s['outlier_auroc']:.3f} |", flush=True)  # fmt: skip
            if line != how:
                print(f"<!-- {name}: {line} -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
