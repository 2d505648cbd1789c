"""Keep glibc from handing freed memory back to the kernel after every message.

Every page frame (about 1 MiB) is a fresh allocation on both sides of a
migration. With glibc's defaults, blocks that big are mmap'd and munmap'd one
by one, so each message pays ~256 page faults and zeroing: measured here, a
plain gRPC stream went from 0.97 to 1.56 GB/s once large blocks stay in the
heap (see ../shared/PERF-NOTES.md for the same effect on protobuf).
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20     # glibc's maximum on 64-bit
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20


def tune_malloc() -> bool:
    """Raise the mmap and trim thresholds; False if this libc has no mallopt."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD)))
