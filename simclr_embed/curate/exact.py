"""Byte-identical files: grouped by size first (a file of a size no other file has cannot have
a copy, and costs only a ``stat``), then by a BLAKE2b digest of the contents, read in 1 MiB
pieces by a pool of threads (hashlib releases the GIL on large buffers)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Sequence

CHUNK = 1 << 20
Progress = Callable[[int], None]  # called with the number of files hashed so far


def file_digest(path: str) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while piece := f.read(CHUNK):
            h.update(piece)
    return h.digest()


def missing_files(paths: Sequence[str]) -> list[str]:
    return [p for p in paths if not os.path.isfile(p)]


def exact_groups(
    paths: Sequence[str], workers: int = 8, progress: Progress | None = None
) -> list[list[int]]:
    """Rows whose files have identical bytes, each group in row order, groups by their first row."""
    sizes = [os.path.getsize(path) for path in paths]  # one stat per file
    by_size: dict[int, list[int]] = defaultdict(list)
    for row, size in enumerate(sizes):
        by_size[size].append(row)
    candidates = [row for rows in by_size.values() if len(rows) > 1 for row in rows]
    by_digest: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="simclr-hash") as pool:
        digests = pool.map(lambda r: file_digest(paths[r]), candidates, chunksize=16)
        for done, (row, digest) in enumerate(zip(candidates, digests, strict=True), 1):
            by_digest[(sizes[row], digest)].append(row)
            if progress is not None and done % 256 == 0:
                progress(done)
    if progress is not None:
        progress(len(candidates))
    groups = [sorted(rows) for rows in by_digest.values() if len(rows) > 1]
    return sorted(groups, key=lambda g: g[0])
