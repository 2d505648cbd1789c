"""Page checksums: xxh3_64 per 4 KiB page, as in a checkpoint's page index.

Used where pages are hashed (writing a checkpoint, incremental checkpoints)
and where pages read back are checked against an index (restoring a mapped
checkpoint in full or lazily).
"""

from __future__ import annotations

import mmap

import numpy as np
import xxhash

PAGE = 4096

ZERO_PAGE_HASH = xxhash.xxh3_64_intdigest(bytes(PAGE))


def page_hashes(memory: mmap.mmap, first_page: int, count: int,
                nonzero: np.ndarray | None = None) -> np.ndarray:
    """xxh3_64 of each page (zero pages are recognised without hashing)."""
    if nonzero is None:
        view = np.frombuffer(memory, dtype=np.uint64, count=count * 512,
                             offset=first_page * PAGE)
        nonzero = view.reshape(count, 512).any(axis=1)
    out = np.full(count, ZERO_PAGE_HASH, dtype=np.uint64)
    mv = memoryview(memory)
    digest = xxhash.xxh3_64_intdigest
    for i in np.flatnonzero(nonzero).tolist():
        off = (first_page + i) * PAGE
        out[i] = digest(mv[off:off + PAGE])
    mv.release()
    return out


def first_mismatch(memory: mmap.mmap, first_page: int, expected: np.ndarray) -> int | None:
    """The index (from 0) of the first of len(expected) pages of `memory`,
    starting at `first_page`, whose xxh3_64 is not the expected one; None if
    all match (a checkpoint's page index against what was read from it)."""
    got = page_hashes(memory, first_page, len(expected))
    bad = np.flatnonzero(got != expected)
    return int(bad[0]) if len(bad) else None
