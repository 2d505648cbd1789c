"""Choosing and encoding pages (migrate/pages.py) against simple references."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from vmigrate.migrate import pages


def _bitmap(bits: np.ndarray) -> np.ndarray:
    padded = np.zeros(((len(bits) + 63) // 64) * 64, np.uint8)
    padded[:len(bits)] = bits
    return np.packbits(padded, bitorder="little").view(np.uint64)


def _reference_runs(bits: np.ndarray, breaks: list[int], most: int) -> list[tuple[int, int]]:
    out, i, n = [], 0, len(bits)
    while i < n:
        if not bits[i]:
            i += 1
            continue
        j = i
        while j < n and bits[j] and j - i < most and not (j > i and j in breaks):
            j += 1
        out.append((i, j - i))
        i = j
    return out


@pytest.mark.parametrize("seed", range(40))
def test_runs_and_counts_match_a_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    bits = (rng.random(n) < rng.random()).astype(np.uint8)
    breaks = sorted({int(x) for x in rng.integers(1, n + 1, size=3)})
    bm = _bitmap(bits)
    assert list(pages.runs(bm, n, breaks, max_pages=7)) == _reference_runs(bits, breaks, 7)
    assert pages.count_pages(bm) == int(bits.sum())


@pytest.mark.parametrize("compress", [False, True])
def test_encode_then_decode_gives_the_same_memory(compress):
    size = 8 << 20
    src = mmap.mmap(-1, size)
    rng = np.random.default_rng(1)
    words = np.frombuffer(src, dtype=np.uint64).reshape(-1, 512)
    for p in range(0, size // 4096, 3):          # every third page holds data, some half-random
        words[p, :256] = rng.integers(0, 2**63, 256, dtype=np.uint64)
        words[p, 256:] = p
    del words
    layout = pages.Layout([(0, size, 0)])
    everything = pages.bitmap_from_ranges([(0, size)], size // 4096)
    enc = pages.Encoder(src, layout, compress)
    dst = mmap.mmap(-1, size)
    dst[:] = b"\xff" * size                      # not fresh: zero chunks must clear pages
    dec = pages.Decoder(dst, layout, fresh=False)
    counts = pages.Counts()
    for batch in enc.batches(everything, counts):
        for chunk in batch:
            dec.apply(chunk.to_msg())
    enc.close()
    dec.close()
    assert dst[:] == src[:]
    assert counts.pages == size // 4096 and counts.pages_zero > 0
    assert (counts.pages_compressed > 0) == compress


def test_a_damaged_chunk_is_refused():
    size = 1 << 20
    src = mmap.mmap(-1, size)
    src[:4096] = b"x" * 4096
    layout = pages.Layout([(0, size, 0)])
    enc = pages.Encoder(src, layout, False)
    chunk = enc.encode_run(0, 1, pages.Counts())[0].to_msg()
    enc.close()
    chunk.data = b"y" + chunk.data[1:]
    dec = pages.Decoder(mmap.mmap(-1, size), layout)
    with pytest.raises(pages.BadChunk, match="checksum mismatch"):
        dec.apply(chunk)
    chunk.guest_phys_addr = size
    with pytest.raises(pages.BadChunk, match="outside guest memory"):
        dec.apply(chunk)
