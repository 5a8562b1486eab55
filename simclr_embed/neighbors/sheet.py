"""Contact sheets: rows of thumbnails a person can judge at a glance.

A row is an image and what was found for it: its nearest neighbours (similarity under each)
or a duplicate group (similarity to the group's first image). Every cell is the same size, so a
sheet of R rows × C cells is exactly ``sheet_size(R, C)`` pixels; ``side_by_side`` puts sheets
next to each other under titles (the demo: trained vs untrained model on the same images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from simclr_embed.fileio import atomic_path
from simclr_embed.imageio import open_image

THUMB = 96  # px, square
CAPTION = 16  # px of text under each thumbnail
PAD = 4
TITLE = 22  # px above each sheet in side_by_side
BACKGROUND = (255, 255, 255)
FIRST = (40, 110, 200)  # frame of a row's first cell (the query / the group's first image)


@dataclass(frozen=True)
class Cell:
    path: str
    caption: str


def sheet_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of a sheet of ``rows`` × ``cols`` cells."""
    return PAD + cols * (THUMB + PAD), PAD + rows * (THUMB + CAPTION + PAD)


def _thumb(path: str) -> Image.Image:
    try:
        img = open_image(path, draft_size=THUMB)
    except Exception:  # a moved or broken file: the sheet is still drawn, the cell says so
        tile = Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
        ImageDraw.Draw(tile).text((8, THUMB // 2 - 6), "unreadable", fill=(90, 0, 0))
        return tile
    return ImageOps.pad(img, (THUMB, THUMB), color=BACKGROUND)  # whole image, letterboxed


def draw_sheet(rows: Sequence[Sequence[Cell]], cols: int | None = None) -> Image.Image:
    """Rows of cells (each row: its first image, then what was found), left-aligned."""
    cols = cols or max((len(r) for r in rows), default=1)
    sheet = Image.new("RGB", sheet_size(len(rows), cols), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    cache: dict[str, Image.Image] = {}
    for r, row in enumerate(rows):
        y = PAD + r * (THUMB + CAPTION + PAD)
        for c, cell in enumerate(row[:cols]):
            x = PAD + c * (THUMB + PAD)
            if cell.path not in cache:
                cache[cell.path] = _thumb(cell.path)
            sheet.paste(cache[cell.path], (x, y))
            if c == 0:
                draw.rectangle((x - 2, y - 2, x + THUMB + 1, y + THUMB + 1), outline=FIRST, width=2)
            draw.text((x + 2, y + THUMB + 2), cell.caption[:16], fill=(0, 0, 0))
    return sheet


def side_by_side(sheets: Sequence[Image.Image], titles: Sequence[str]) -> Image.Image:
    width = sum(s.width for s in sheets) + PAD * (len(sheets) - 1)
    height = TITLE + max(s.height for s in sheets)
    out = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(out)
    x = 0
    for sheet, title in zip(sheets, titles, strict=True):
        out.paste(sheet, (x, TITLE))
        draw.text((x + PAD, 5), title, fill=(0, 0, 0))
        x += sheet.width + PAD
    return out


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
