"""Restoring guest memory on demand from a mapped-layout checkpoint.

The guest runs as soon as its state is loaded; its memory comes from the file
as it touches it (userfaultfd, missing-page mode on the memfd mapping), while a
background thread copies the rest in order. Every page read from the file is
checked against the file's page index before the guest can see it. Pages the
file holds as holes are zero: they are left to fault in normally once the
background copy is done and userfaultfd is unregistered.

Until that copy is done, no other process may read the guest's memory file:
reading a missing page through another mapping would make it a zero page
behind the guest's back. The VMM's Memory call therefore waits for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable

import numpy as np

from vmigrate.vmm.memory import data_ranges
from vmigrate.vmm.pagehash import first_mismatch

log = logging.getLogger("vmigrate.lazymem")

PAGE = 4096
CLUSTER = 16 * PAGE          # a fault brings in 64 KiB around it (faults come in runs)
PREFETCH = 2 << 20           # the background copy moves 2 MiB at a time
SYS_USERFAULTFD = 323        # x86_64
UFFD_API = 0xAA
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12
EEXIST = 17

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (UFFD_API << 8) | nr


UFFDIO_API = _iowr(0x3F, 24)
UFFDIO_REGISTER = _iowr(0x00, 32)
UFFDIO_UNREGISTER = (2 << 30) | (16 << 16) | (UFFD_API << 8) | 0x01
UFFDIO_COPY = _iowr(0x03, 40)


class LazyError(Exception):
    pass


class LazyMemory:
    """Serves the guest's missing pages from `path` (image at `image_offset`)."""

    def __init__(self, base: int, size: int, path: str, image_offset: int,
                 page_index: bytes, on_damage: Callable[[str], None]) -> None:
        self.base, self.size = base, size
        self.image_offset = image_offset
        self.hashes = np.frombuffer(page_index, dtype=np.uint64)
        if len(self.hashes) != size // PAGE:
            raise LazyError("the page index does not cover guest memory")
        self.on_damage = on_damage
        try:
            self.file = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise LazyError(f"cannot open {path}: {e.strerror}") from None
        self.uffd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if self.uffd < 0:
            err = ctypes.get_errno()
            os.close(self.file)
            raise LazyError(f"userfaultfd is not available here ({os.strerror(err)})")
        api = (ctypes.c_uint64 * 3)(UFFD_API, UFFD_FEATURE_MISSING_SHMEM, 0)
        reg = (ctypes.c_uint64 * 4)(base, size, UFFDIO_REGISTER_MODE_MISSING, 0)
        if (_libc.ioctl(self.uffd, UFFDIO_API, ctypes.addressof(api)) != 0
                or _libc.ioctl(self.uffd, UFFDIO_REGISTER, ctypes.addressof(reg)) != 0):
            err = ctypes.get_errno()
            self._close_fds()
            raise LazyError(f"cannot register guest memory with userfaultfd "
                            f"({os.strerror(err)})")
        # (memory offset, length) of the image parts that hold data
        self.data_ranges = [(o - image_offset, n) for o, n in
                            data_ranges(self.file, image_offset + size, start=image_offset)]
        self.total = sum(length for _, length in self.data_ranges)
        self.copied = 0
        self.faults = 0
        self.done = threading.Event()
        self.damaged = ""
        self._lock = threading.Lock()       # one UFFDIO_COPY at a time keeps counting simple
        self._buf = mmap.mmap(-1, max(CLUSTER, PREFETCH))
        self._buf_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
        self._fault_buf = mmap.mmap(-1, CLUSTER)
        self._fault_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._fault_buf))
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._prefetched = threading.Event()
        self._handler = threading.Thread(target=self._serve_faults, name="uffd", daemon=True)
        self._prefetcher = threading.Thread(target=self._prefetch, name="prefetch", daemon=True)

    def start(self) -> None:
        self._handler.start()
        self._prefetcher.start()

    # ---------------------------------------------------------------- copying
    def _read_checked(self, mem_off: int, length: int, buf: mmap.mmap) -> bool:
        """Read pages from the file into buf and check them; False if damaged."""
        view = memoryview(buf)[:length]
        try:
            n = os.preadv(self.file, [view], self.image_offset + mem_off)
        finally:
            view.release()
        if n < length:
            buf[n:length] = bytes(length - n)    # beyond the file's end: zero
        first = mem_off // PAGE
        bad = first_mismatch(buf, 0, self.hashes[first:first + length // PAGE])
        if bad is not None:
            self.damaged = (f"page at offset {(first + bad) * PAGE:#x} of the checkpoint's "
                            "memory image is damaged (it does not match the page index)")
            return False
        return True

    def _copy(self, mem_off: int, length: int, src: int) -> int:
        """UFFDIO_COPY; returns bytes placed (pages already present are skipped)."""
        placed = 0
        while placed < length:
            cp = (ctypes.c_uint64 * 5)(self.base + mem_off + placed, src + placed,
                                       length - placed, 0, 0)
            rc = _libc.ioctl(self.uffd, UFFDIO_COPY, ctypes.addressof(cp))
            done = ctypes.c_int64.from_buffer(cp, 32).value
            if rc == 0:
                return placed + length - placed
            err = ctypes.get_errno()
            if done > 0:
                placed += done
                continue
            if err == EEXIST or -done == EEXIST:
                placed += PAGE                     # already there: skip one page
                continue
            if err == 11:                          # EAGAIN: mappings changing; retry
                continue
            raise LazyError(f"UFFDIO_COPY failed: {os.strerror(err)}")
        return placed

    def _serve_faults(self) -> None:
        """The one thread that uses the userfaultfd: serves faults until the
        background copy is done, then unregisters and closes it itself, so no
        fault is ever served through a closed or reused descriptor."""
        try:
            while not self._stop.is_set():
                if self._prefetched.is_set():
                    self._finish()
                    return
                r, _, _ = select.select([self.uffd], [], [], 0.05)
                if not r:
                    continue
                try:
                    msg = os.read(self.uffd, 32)
                except BlockingIOError:
                    continue
                if len(msg) < 32 or msg[0] != UFFD_EVENT_PAGEFAULT:
                    continue
                addr = struct.unpack_from("<Q", msg, 16)[0]
                mem_off = (addr - self.base) & ~(CLUSTER - 1)
                length = min(CLUSTER, self.size - mem_off)
                with self._lock:
                    self.faults += 1
                    # Holes read back as zeros, and the index holds the zero page's hash.
                    if not self._read_checked(mem_off, length, self._fault_buf):
                        self._fail()
                        return
                    self._copy(mem_off, length, self._fault_addr)
        except (LazyError, OSError) as e:
            # Nothing serves the guest's faults any more: stop it, loudly.
            self.damaged = self.damaged or f"lazy restore failed: {e}"
            self._fail()

    def _prefetch(self) -> None:
        try:
            for off, length in self.data_ranges:
                pos = off
                while pos < off + length and not self._stop.is_set():
                    n = min(PREFETCH, off + length - pos)
                    with self._lock:
                        if not self._read_checked(pos, n, self._buf):
                            self._fail()
                            return
                        self._copy(pos, n, self._buf_addr)
                        self.copied += n
                    pos += n
        except (LazyError, OSError) as e:
            self.damaged = self.damaged or f"lazy restore failed: {e}"
            self._fail()
            return
        if not self._stop.is_set():
            self._prefetched.set()      # the fault thread finishes up

    def _finish(self) -> None:
        """Every page that holds data is in; the rest are zero and may fault in
        the ordinary way (unregistering wakes any fault still waiting)."""
        rng = (ctypes.c_uint64 * 2)(self.base, self.size)
        _libc.ioctl(self.uffd, UFFDIO_UNREGISTER, ctypes.addressof(rng))
        self._stop.set()
        self._close_fds()
        log.info("lazy restore complete: %d MiB in %.2f s, %d faults served",
                 self.copied >> 20, time.monotonic() - self.started, self.faults)
        self.done.set()

    def _fail(self) -> None:
        self._stop.set()
        self.on_damage(self.damaged)

    def progress(self) -> tuple[int, int]:
        return self.copied, self.total

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)

    def _close_fds(self) -> None:
        for fd in ("uffd", "file"):
            with contextlib.suppress(OSError):
                os.close(getattr(self, fd))
            setattr(self, fd, -1)

    def close(self) -> None:
        self._stop.set()
        if self.uffd >= 0:
            with contextlib.suppress(Exception):
                self._handler.join(1)
                self._prefetcher.join(1)
            self._close_fds()
