"""``--html``: a static gallery in ``DIR/index.html`` — no server, no external URL, opens from
``file://``. Pages: duplicate groups (exact, then near), outliers, clusters (most central images
first), the selection; ``PER_PAGE`` images a page, so a million images never land on one. Every
image shown links to a page of its nearest neighbours. Thumbnails (``DIR/thumbs/``, JPEG, at most
``THUMB`` px) are made only for the images shown, by a thread pool, a bounded number at a time.

Each page counts its images loaded into ``<body data-loaded>`` once the page has loaded (what the
headless-browser test reads), and the index shows every count in an element with an ``id``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import html
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from simclr_embed.fileio import atomic_write_text

THUMB = 160
PER_PAGE = 200
CLUSTER_SHOWN = 12  # central images shown per cluster

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
    "nav a{margin-right:1em} h2{margin-top:1.5em;font-size:1.1em}"
    ".row{display:flex;flex-wrap:wrap;gap:6px;margin:.4em 0 1em}"
    f"figure{{margin:0;width:{THUMB}px;font-size:11px;overflow-wrap:anywhere}}"
    f"figure img{{width:{THUMB}px;height:{THUMB}px;object-fit:contain;background:#eee;"
    "display:block} .pages a{margin-right:.5em}"
)
_COUNT_LOADED = (
    "<script>window.addEventListener('load',function(){var n=0;"
    "document.querySelectorAll('img').forEach(function(i){if(i.complete&&i.naturalWidth>0)n++});"
    "document.body.dataset.loaded=n;document.body.dataset.images="
    "document.querySelectorAll('img').length;});</script>"
)


@dataclass
class Tile:
    row: int
    caption: str


@dataclass
class Section:
    """A titled run of tiles (a duplicate group, a cluster, or a flat list)."""

    title: str
    tiles: list[Tile]


@dataclass
class Gallery:
    out: Path
    paths: Sequence[str]
    neighbors: Callable[[int], list[tuple[int, float]]]  # row → [(row, cosine)], nearest first
    shown: set[int] = field(default_factory=set)

    def thumb_name(self, row: int) -> str:
        return "thumbs/" + hashlib.sha1(self.paths[row].encode()).hexdigest()[:16] + ".jpg"

    def figure(self, tile: Tile, prefix: str = "") -> str:
        self.shown.add(tile.row)
        name = html.escape(os.path.basename(self.paths[tile.row]))
        full = html.escape(self.paths[tile.row])
        return (
            f'<figure><a href="{prefix}nn/{tile.row}.html" title="{full}">'
            f'<img src="{prefix}{self.thumb_name(tile.row)}" alt="{name}" loading="lazy"></a>'
            f"<figcaption>{html.escape(tile.caption)}<br>{name}</figcaption></figure>"
        )

    def page(self, name: str, title: str, body: str, prefix: str = "") -> None:
        nav = " ".join(
            f'<a href="{prefix}{n}">{t}</a>'
            for n, t in (
                ("index.html", "summary"),
                ("duplicates-0.html", "duplicates"),
                ("outliers-0.html", "outliers"),
                ("clusters-0.html", "clusters"),
                ("selection-0.html", "selection"),
            )
        )
        text = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style></head><body><nav>{nav}</nav>"
            f"<h1>{html.escape(title)}</h1>{body}{_COUNT_LOADED}</body></html>"
        )
        atomic_write_text(self.out / name, text)

    def paged(self, stem: str, title: str, sections: Sequence[Section], intro: str = "") -> int:
        """Write ``stem-0.html``, ``stem-1.html``, ... holding ``sections`` (a section is
        never split across pages unless it alone is over a page); returns the page count."""
        pages: list[list[Section]] = [[]]
        count = 0
        for section in sections:
            for start in range(0, max(1, len(section.tiles)), PER_PAGE):
                part = Section(section.title, section.tiles[start : start + PER_PAGE])
                if count and count + len(part.tiles) > PER_PAGE:
                    pages.append([])
                    count = 0
                pages[-1].append(part)
                count += len(part.tiles)
        for p, page in enumerate(pages):
            links = " ".join(
                f'<a href="{stem}-{q}.html">{"[" if q == p else ""}{q + 1}{"]" if q == p else ""}</a>'
                for q in range(len(pages))
            )
            body = (
                f"<p>{intro}</p><p class='pages'>pages: {links}</p>"
                if intro or len(pages) > 1
                else ""
            )
            for section in page:
                tiles = "".join(self.figure(t) for t in section.tiles)
                body += f"<h2>{html.escape(section.title)}</h2><div class='row'>{tiles}</div>"
            if not page:
                body += "<p>nothing here</p>"
            self.page(f"{stem}-{p}.html", title, body)
        return len(pages)

    def neighbour_pages(self) -> None:
        """``nn/<row>.html`` for every image shown: it, then its nearest neighbours."""
        (self.out / "nn").mkdir(exist_ok=True)
        for row in sorted(self.shown):
            tiles = [Tile(row, "this image")] + [
                Tile(j, f"cosine {s:.3f}") for j, s in self.neighbors(row)
            ]
            body = "<div class='row'>" + "".join(self.figure(t, "../") for t in tiles) + "</div>"
            self.page(f"nn/{row}.html", self.paths[row], body, "../")

    def thumbnails(self, progress: Callable[[int], None] | None = None, workers: int = 0) -> int:
        """Make every shown image's thumbnail (skipping ones already there); returns how many
        could not be read."""
        (self.out / "thumbs").mkdir(exist_ok=True)
        todo = [r for r in sorted(self.shown) if not (self.out / self.thumb_name(r)).exists()]
        failed = 0
        with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 2) as pool:
            for done, ok in enumerate(_bounded(pool, self._thumb, todo), 1):
                failed += not ok
                if progress is not None and done % 64 == 0:
                    progress(done)
        return failed

    def _thumb(self, row: int) -> bool:
        target = self.out / self.thumb_name(row)
        try:
            with Image.open(self.paths[row]) as img:
                img.draft("RGB", (THUMB, THUMB))  # JPEG: decode at a fraction of the size
                small = ImageOps.exif_transpose(img).convert("RGB")
                small.thumbnail((THUMB, THUMB))
            tmp = target.with_name(f".{target.name}.tmp")
            small.save(tmp, "JPEG", quality=85)
            os.replace(tmp, target)
            return True
        except Exception:  # unreadable now (changed or gone): the tile shows its name
            return False


def _bounded(
    pool: concurrent.futures.Executor, fn: Callable[[int], bool], items: Iterable[int]
) -> Iterable[bool]:
    """``pool.map`` with at most 4 × workers tasks pending: memory bounded in the item count."""
    pending: list[concurrent.futures.Future[bool]] = []
    limit = 4 * getattr(pool, "_max_workers", 4)
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= limit:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()
