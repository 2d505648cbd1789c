"""Keep glibc from handing freed memory back to the kernel after every message.

Every page frame (about 1 MiB) is a fresh allocation on both sides of a
migration. With glibc's defaults, blocks that big are mmap'd and munmap'd one
by one, so each message pays ~256 page faults and zeroing: measured here, a
plain gRPC stream went from 0.97 to 1.56 GB/s once large blocks stay in the
heap (see ../shared/PERF-NOTES.md for the same effect on protobuf).
"""

from __future__ import annotations

import ctypes
import threading
import time

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8
MMAP_THRESHOLD = 32 << 20     # glibc's maximum on 64-bit
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20


def tune_malloc(arenas: int = 0) -> bool:
    """Raise the mmap and trim thresholds; False if this libc has no mallopt.

    `arenas` > 0 caps glibc's malloc arenas (call it before threads start).
    Each thread arena is a 64 MiB heap whose free top malloc_trim() never
    returns; with the trim threshold this high, a long-lived process with
    many threads keeps up to 64 MiB per arena resident (measured in the
    agent: 16 arenas, 16 MiB in use, 240 MiB resident). In one arena,
    malloc_trim() gives back everything free.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = [(M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (M_TOP_PAD, TOP_PAD)]
    if arenas > 0:
        settings.append((M_ARENA_MAX, arenas))
    return all(mallopt(param, value) == 1 for param, value in settings)


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim(0))."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def start_heap_trimmer(interval_s: float = 30.0) -> threading.Thread:
    """A long-lived process (the agent) keeps the thresholds above for speed,
    and gives freed memory back every `interval_s`: one trim costs a few ms
    and the next migration's first frames a few page faults, while without it
    every migration's peak stays resident (soak: 72 -> 350 MiB per agent)."""
    def loop() -> None:
        while True:
            time.sleep(interval_s)
            release_free_heap()

    t = threading.Thread(target=loop, name="heap-trimmer", daemon=True)
    t.start()
    return t
