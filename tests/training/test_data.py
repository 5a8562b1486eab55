"""Training data: recursive listing, bad files skipped and reported, odd image modes, sampler."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_embed.errors import SimclrError
from simclr_embed.training.augment import SimCLRAugment
from simclr_embed.training.data import (
    ResumableSampler,
    UnlabeledImages,
    build_train_loader,
    collate_views,
    find_images,
)
from tests.conftest import write_image_folder


class RecordingAugment(SimCLRAugment):
    """The real augmentation, also noting the mode and size of every decoded image it gets."""

    def __init__(self, size: int) -> None:
        super().__init__(size, strength=0.5)
        self.seen: list[tuple[str, tuple[int, int]]] = []

    def view(self, img: Image.Image) -> torch.Tensor:
        self.seen.append((img.mode, img.size))
        return super().view(img)


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _write_bad_files(root: Path) -> set[str]:
    png = io.BytesIO()
    _rgb(32, 32).save(png, format="PNG")
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "garbage.JPG").write_bytes(b"not an image at all" * 20)
    return {"zero.jpg", "truncated.png", "garbage.JPG"}


def test_find_images_is_recursive_and_case_insensitive(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    _rgb(8, 8).save(tmp_path / "a" / "b" / "deep.PNG")
    _rgb(8, 8).save(tmp_path / "top.JpG", format="JPEG")
    _rgb(8, 8).save(tmp_path / "a" / "x.webp")
    _rgb(8, 8).save(tmp_path / "a" / "y.TIFF")
    (tmp_path / "notes.txt").write_text("not an image")
    _rgb(8, 8).save(tmp_path / ".hidden.png")
    names = sorted(p.name for p in find_images(tmp_path))
    assert names == ["deep.PNG", "top.JpG", "x.webp", "y.TIFF"]


def test_missing_or_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SimclrError, match=r"--data .*no such folder"):
        find_images(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("x")
    with pytest.raises(SimclrError, match="no image files found"):
        find_images(tmp_path / "empty")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(SimclrError, match="not a folder"):
        find_images(tmp_path / "file.png")


def test_corrupt_files_are_skipped_reported_and_replaced(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=2)  # 6 good PNGs
    bad = _write_bad_files(tmp_path)
    paths = find_images(tmp_path)
    assert len(paths) == 9
    ds = UnlabeledImages(paths, SimCLRAugment(32, strength=0.5), seed=0)
    items = [ds[(i, 0)] for i in range(len(ds))]
    assert all(ok for *_, ok in items)  # every sample was replaced by a readable neighbour
    reported = [f for _, _, failed, _ in items for f in failed]
    assert {Path(f.split(" (")[0]).name for f in reported} == bad
    assert len(reported) == len(bad)  # once each: known-bad files are not decoded again
    assert all("(" in f for f in reported)  # with a reason
    batch = collate_views(items)
    assert batch["view1"].shape == (9, 3, 32, 32) and batch["ok"] and len(batch["failed"]) == 3
    # The substitute is deterministic: a fresh dataset gives the very same views.
    fresh = UnlabeledImages(paths, SimCLRAugment(32, strength=0.5), seed=0)
    for i, p in enumerate(paths):
        if p.name in bad:
            assert torch.equal(fresh[(i, 0)][0], items[i][0])


def test_all_files_bad_gives_not_ok(tmp_path: Path) -> None:
    _write_bad_files(tmp_path)
    ds = UnlabeledImages(find_images(tmp_path), SimCLRAugment(32), seed=0)
    v1, _, failed, ok = ds[(0, 0)]
    assert not ok and len(failed) == 3 and v1.shape == (3, 32, 32)
    assert not collate_views([ds[(1, 0)], ds[(2, 0)]])["ok"]


def test_odd_modes_and_exif_become_upright_rgb(tmp_path: Path) -> None:
    rgb = _rgb(40, 20)
    rgb.convert("L").save(tmp_path / "gray.png")
    rgb.convert("RGBA").save(tmp_path / "rgba.png")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgb.convert("P").save(tmp_path / "palette.gif")
    Image.fromarray((np.arange(800).reshape(20, 40) * 80).astype(np.uint16)).save(
        tmp_path / "gray16.png"
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° → displayed as 20 wide × 40 high
    rgb.save(tmp_path / "rotated.jpg", exif=exif)
    paths = find_images(tmp_path)
    aug = RecordingAugment(16)
    ds = UnlabeledImages(paths, aug, seed=0)
    for i in range(len(ds)):
        v1, v2, failed, ok = ds[(i, 0)]
        assert ok and not failed and v1.shape == v2.shape == (3, 16, 16)
    assert len(aug.seen) == 2 * len(paths)
    by_name = dict(zip((p.name for p in paths), aug.seen[::2], strict=True))
    assert all(mode == "RGB" for mode, _ in by_name.values())
    assert by_name["rotated.jpg"][1] == (20, 40)
    assert by_name["gray.png"][1] == (40, 20)
    with Image.open(tmp_path / "gray16.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file


def test_sampler_shards_skips_and_keys_by_epoch(tmp_path: Path) -> None:
    data = list(range(22))
    r0 = ResumableSampler(data, num_replicas=2, rank=0, seed=3, batch_size=4)
    r1 = ResumableSampler(data, num_replicas=2, rank=1, seed=3, batch_size=4)
    r0.set_epoch(1)
    r1.set_epoch(1)
    k0, k1 = list(r0), list(r1)
    assert len(k0) == len(k1) == 11 and all(e == 1 for _, e in k0)
    assert not {i for i, _ in k0} & {i for i, _ in k1}
    r0.set_epoch(1, start_batch=2)
    assert list(r0) == k0[8:] and len(r0) == 3
    r0.set_epoch(2)
    assert [i for i, _ in r0] != [i for i, _ in k0]  # reshuffled per epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_do_not_depend_on_workers(tmp_path: Path, workers: int) -> None:
    write_image_folder(tmp_path, per_class=2)
    bad = _write_bad_files(tmp_path)  # 9 files, 3 bad; batch 3 → no sample dropped
    paths = find_images(tmp_path)

    def epoch_batches(w: int) -> list[dict]:
        sampler, loader = build_train_loader(
            paths,
            SimCLRAugment(32, 0.5),
            batch_size=3,
            workers=w,
            seed=5,
            world_size=1,
            rank=0,
            pin_memory=False,
        )
        sampler.set_epoch(1)
        return list(loader)

    reference = epoch_batches(0)
    got = epoch_batches(workers)
    assert len(got) == 3
    for a, b in zip(reference, got, strict=True):
        assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])
    # failed paths come back from worker processes with the batches
    assert {Path(f.split(" (")[0]).name for b in got for f in b["failed"]} == bad
