"""The ``--html`` gallery in a real headless Chromium: every page of it loads from ``file://``
with no console error, every thumbnail loads, and the counts shown equal the TSV files."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from simclr_embed.cli import main as simclr
from tests.curate.test_curate import _tsv


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium here (.ci/run installs Debian's chromium package)")


def render(browser: str, page: Path, profile: Path) -> tuple[str, str]:
    """(DOM after the load event, the browser's log) of one page."""
    run = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, run.stderr


def test_gallery_pages_load_in_chromium(embedded: tuple[Path, dict], tmp_path: Path) -> None:
    browser = _chromium()
    out, _ = embedded
    dest = tmp_path / "cur"
    assert simclr(["curate", "--embeddings", str(out), "--output", str(dest), "--select", "5",
                   "--html", "--outliers", "8"]) == 0  # fmt: skip
    exact = {g for g, _ in _tsv(dest / "exact_duplicates.tsv")}
    near = {g for g, _, _ in _tsv(dest / "duplicates.tsv")}
    pages = ["index.html", "duplicates-0.html", "outliers-0.html", "clusters-0.html",
             "selection-0.html", *sorted(p.relative_to(dest).as_posix() for p in (dest / "nn").glob("*.html"))[:2]]  # fmt: skip
    for name in pages:
        dom, log = render(browser, dest / name, tmp_path / "profile")
        assert not re.search(r"CONSOLE.*(error|Uncaught)|ERR_FILE_NOT_FOUND", log, re.I), log[
            -2000:
        ]
        loaded = re.search(r'data-loaded="(\d+)" data-images="(\d+)"', dom)
        assert loaded, (name, dom[:500])
        assert loaded.group(1) == loaded.group(2), (name, loaded.groups())  # every image loaded
        if name == "index.html":
            assert f'id="n-exact-groups">{len(exact)}<' in dom
            assert f'id="n-near-groups">{len(near)}<' in dom
            assert 'id="n-selected">5<' in dom
        if name == "outliers-0.html":
            assert loaded.group(2) == "8"
