"""``simclr curate`` end to end on real image files embedded by ``simclr embed --model``, each
output checked against an independent computation on the stored vectors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from simclr_embed.cli import main as simclr
from simclr_embed.curate.calibrate import choose_threshold, same_signature, signature
from simclr_embed.curate.cli import negatives
from simclr_embed.curate.near import near_groups
from simclr_embed.curate.outliers import mean_direction_scores
from simclr_embed.neighbors.collection import load_collection
from simclr_embed.neighbors.search import (
    Neighbors,
    build_index,
    duplicate_groups,
    nearest_in,
    normalized,
)
from tests.server.conftest import photo

DISTINCT = 30
COPIED = (3, 7, 11)  # byte copies of these (one of 3, two of 7 and 11)


def write_collection(root: Path) -> tuple[Path, dict[str, list[str]]]:
    """Distinct pictures, byte copies of some, near copies (JPEG q50 + resize) of others, and
    three foreign images (noise, a flat colour, stripes)."""
    root.mkdir(parents=True)
    exact: dict[str, list[str]] = {}
    for i in range(DISTINCT):
        img = photo(96, 80, seed=300 + i)
        name = root / f"p{i:02d}.jpg"
        img.save(name, quality=90)
        if i in COPIED:
            copies = [root / f"sub{c}" / f"p{i:02d}-same.jpg" for c in range(1 if i == 3 else 2)]
            for copy in copies:
                copy.parent.mkdir(exist_ok=True)
                shutil.copy(name, copy)
            exact[str(name)] = [str(c) for c in copies]
        if i < 4:
            img.resize((72, 60), Image.BILINEAR).save(root / f"p{i:02d}-near.jpg", quality=50)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), np.uint8)).save(root / "z-noise.png")
    Image.new("RGB", (96, 80), (250, 20, 200)).save(root / "z-flat.png")
    stripes = np.zeros((80, 96, 3), np.uint8)
    stripes[:, ::4] = 255
    Image.fromarray(stripes).save(root / "z-stripes.png")
    return root, exact


def _vectors(out: Path) -> tuple[np.ndarray, list[str]]:
    v = np.load(out).astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v, (out.parent / (out.name + ".paths.txt")).read_text().splitlines()


def _tsv(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    return [line.split("\t") for line in lines[1:]]


def test_curate_outputs_match_independent_computations(
    embedded: tuple[Path, dict], tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, planted = embedded
    dest = tmp_path / "cur"
    argv = ["curate", "--embeddings", str(out), "--output", str(dest), "--model", str(tiny_onnx),
            "--select", "6", "--clusters", "auto", "--html"]  # fmt: skip
    assert simclr(argv) == 0
    printed = capsys.readouterr().out
    assert "near-duplicate threshold" in printed and "synthetic copies" in printed
    unit, paths = _vectors(out)
    n = len(paths)

    # Exact duplicates: exactly the planted byte copies (recall and precision 1).
    groups: dict[str, set[str]] = {}
    for g, path in _tsv(dest / "exact_duplicates.tsv"):
        groups.setdefault(g, set()).add(path)
    assert sorted(map(sorted, groups.values())) == sorted(
        sorted([k, *v]) for k, v in planted.items()
    )

    # Near duplicates: every pair in a group is at or above the printed threshold (no chaining).
    threshold = float(printed.split("near-duplicate threshold ")[1].split()[0])
    row = {p: i for i, p in enumerate(paths)}
    near: dict[str, list[int]] = {}
    for g, path, sim in _tsv(dest / "duplicates.tsv"):
        members = near.setdefault(g, [])
        members.append(row[path])  # the representative first, then by cosine to it
        assert abs(float(sim) - unit[members[0]] @ unit[row[path]]) < 1e-3
    for members in near.values():
        block = unit[members] @ unit[members].T
        assert block.min() >= threshold - 1e-4, block.min()
    for copies in planted.values():  # byte copies are near-duplicates at any threshold
        assert any(set(row[c] for c in copies) <= set(m) for m in near.values())

    # Outliers: one line per image, highest first, scores = 1 - mean cosine to the 10 nearest
    # others that are not byte copies (brute force here).
    copy_of = np.arange(n)
    for original, copies in planted.items():
        copy_of[[row[original], *(row[c] for c in copies)]] = row[original]
    sims = unit @ unit.T
    expected = {}
    for i in range(n):
        others = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:10]
        kept = [sims[i, j] for j in others if copy_of[j] != copy_of[i]]
        expected[paths[i]] = 1 - np.mean(kept) if kept else 0.0
    rows = _tsv(dest / "outliers.tsv")
    assert len(rows) == n and sorted(p for p, _ in rows) == sorted(paths)
    scores = [float(s) for _, s in rows]
    assert scores == sorted(scores, reverse=True)
    for path, score in rows:
        assert abs(float(score) - expected[path]) < 2e-3, path
    assert Path(rows[0][0]).name.startswith("z-")  # a foreign image is the most unusual

    # Clusters: every image once; ranks 0..size-1 by falling cosine to the centroid.
    table = pq.read_table(dest / "clusters.parquet").to_pydict()
    assert sorted(table["path"]) == sorted(paths)
    for k in set(table["cluster"]):
        idx = [i for i, c in enumerate(table["cluster"]) if c == k]
        ranks = sorted(table["rank"][i] for i in idx)
        assert ranks == list(range(len(idx)))
        by_rank = sorted(idx, key=lambda i: table["rank"][i])
        s = [table["similarity"][i] for i in by_rank]
        assert s == sorted(s, reverse=True)

    # Selection: farthest-point traversal, recomputed here, never two byte copies.
    chosen = (dest / "selection.txt").read_text().splitlines()
    candidates = [i for i in range(n) if copy_of[i] == i]
    center = unit[candidates].mean(axis=0)
    taken = [max(candidates, key=lambda i: unit[i] @ center)]
    while len(taken) < 6:
        dist = {i: min(1 - unit[i] @ unit[t] for t in taken) for i in candidates if i not in taken}
        taken.append(max(dist, key=lambda i: (dist[i], -i)))
    assert chosen == [paths[i] for i in taken]

    # The gallery: pages and thumbnails for what they show, counts equal to the files.
    index = (dest / "index.html").read_text()
    assert f"id='n-exact-groups'>{len(groups)}<" in index
    assert f"id='n-near-groups'>{len(near)}<" in index
    assert (dest / "duplicates-0.html").is_file() and list((dest / "thumbs").glob("*.jpg"))
    assert "http://" not in index and "https://" not in index


def test_refusals_before_any_work(
    embedded: tuple[Path, dict], tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = embedded
    dest = tmp_path / "cur"
    dest.mkdir()
    (dest / "outliers.tsv").write_text("keep me\n")
    assert simclr(["curate", "--embeddings", str(out), "--output", str(dest)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (dest / "outliers.tsv").read_text() == "keep me\n"
    with pytest.raises(SystemExit) as exc:
        simclr(["curate", "--embeddings", str(out), "--clusters", "many"])
    assert exc.value.code == 2
    # A file deleted since embedding: one line, exit 1, nothing written.
    moved = tmp_path / "moved"
    shutil.copytree(out.parent / "data", moved / "data")
    text = (out.parent / (out.name + ".paths.txt")).read_text()
    shutil.copy(out, moved / "emb.npy")
    (moved / "emb.npy.paths.txt").write_text(text.replace(str(out.parent / "data"), str(moved / "data")))  # fmt: skip
    next((moved / "data").glob("p05.jpg")).unlink()
    assert simclr(["curate", "--embeddings", str(moved / "emb.npy")]) == 1
    assert "1 of the" in capsys.readouterr().err
    assert not (moved / "emb.npy.curate").exists() or not any((moved / "emb.npy.curate").iterdir())


def test_cliques_do_not_chain_where_components_do() -> None:
    """a~b and b~c above the threshold, a~c below: components chain all three, cliques do not."""
    angle = np.deg2rad([0.0, 10.0, 20.0, 90.0])
    unit = np.stack([np.cos(angle), np.sin(angle), np.zeros(4)], 1).astype(np.float32)
    sims = unit @ unit.T
    order = np.argsort(-sims, axis=1)[:, 1:3]
    found = Neighbors(order, np.take_along_axis(sims, order, 1))
    threshold = float(np.cos(np.deg2rad(12)))  # 10° pairs in, the 20° pair out
    chained = duplicate_groups(unit, found, threshold)
    assert [sorted(g.members.tolist()) for g in chained] == [[0, 1, 2]]
    cliques = near_groups(unit, found, threshold)
    assert len(cliques) == 1 and len(cliques[0].members) == 2


def test_threshold_sits_between_copies_and_other_images() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.uniform(0.95, 0.99, 500), rng.uniform(0.5, 0.9, 500)
    t = choose_threshold(pos, neg)
    assert 0.9 < t < 0.95
    overlap = choose_threshold(rng.uniform(0.8, 0.99, 500), neg)  # precision first
    assert overlap > np.quantile(neg, 0.99)


def test_calibration_negatives_leave_out_the_collections_own_near_copies(
    embedded: tuple[Path, dict],
) -> None:
    """Each p0i-near.jpg (q50, resized) is the same picture as p0i.jpg; distinct photos are not.
    A near (or byte) copy is never a negative: the negative is the next neighbour, and the row is
    counted. (copy_of is left unset, so p03's byte copy is found by its picture here.)"""
    out, _ = embedded
    coll = load_collection(out)
    unit = normalized(coll.vectors)
    found = nearest_in(build_index(unit), unit, 10)
    row = {Path(p).name: i for i, p in enumerate(coll.paths)}
    sig = {name: signature(Path(coll.paths[i]).read_bytes()) for name, i in row.items()}
    for i in range(4):
        assert same_signature(sig[f"p{i:02d}.jpg"], sig[f"p{i:02d}-near.jpg"])
    assert not any(same_signature(sig["p20.jpg"], sig[f"p{i:02d}.jpg"]) for i in range(21, 30))
    copy_of = np.arange(len(unit))
    rows = np.array([row[f"p{i:02d}.jpg"] for i in range(4)])
    values, set_aside = negatives(coll, found, copy_of, rows)
    expected, aside = [], 0
    for r in rows:  # independently: the nearest other row that is not its own near/byte copy
        others = [j for j in np.argsort(-(unit @ unit[r]), kind="stable") if j != r]
        stem = Path(coll.paths[r]).stem
        family = {j for j in others if Path(coll.paths[j]).name.startswith(stem + "-")}
        aside += others[0] in family
        expected.append(unit[r] @ unit[next(j for j in others if j not in family)])
    assert set_aside == aside
    np.testing.assert_allclose(values, expected, atol=1e-4)


def test_mean_direction_scores_in_chunks() -> None:
    unit = normalized(np.random.default_rng(3).normal(size=(50, 8)).astype(np.float32))
    mean = unit.astype(np.float64).mean(axis=0)
    expected = 1 - unit @ (mean / np.linalg.norm(mean))
    np.testing.assert_allclose(mean_direction_scores(unit, chunk=7), expected, atol=1e-6)
