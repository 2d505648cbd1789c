"""Guest RAM: one memfd, mapped into the VMM and registered as KVM slots.

The memfd is the guest's memory *file*: its offset 0 is the first byte of RAM,
regions of guest-physical address space map onto contiguous ranges of it (RAM
above 3 GiB skips the MMIO hole). Other processes (the node agent, a newer
VMM) open it through /proc/<pid>/fd/<n> and see the same pages without a copy.
Dirty pages are reported per page of the file, so everything that moves memory
speaks file offsets and never cares about the hole.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass

import numpy as np

from vmigrate.vmm import kvm

PAGE = 4096
GIB = 1 << 30
LOW_RAM_LIMIT = 3 * GIB         # RAM above this moves to 4 GiB (PCI/MMIO hole)
HIGH_RAM_START = 4 * GIB
SEEK_DATA, SEEK_HOLE = 3, 4


@dataclass(frozen=True)
class Region:
    guest_phys_addr: int
    size: int
    file_offset: int


def default_layout(size: int) -> list[Region]:
    if size <= 0 or size % PAGE:
        raise ValueError("memory size must be a positive multiple of 4 KiB")
    low = min(size, LOW_RAM_LIMIT)
    regions = [Region(0, low, 0)]
    if size > low:
        regions.append(Region(HIGH_RAM_START, size - low, low))
    return regions


def host_available_memory() -> int:
    """Bytes the host can still give (MemAvailable + SwapFree)."""
    info: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            info[key] = int(rest.split()[0]) * 1024
    return info.get("MemAvailable", 0) + info.get("SwapFree", 0)


class GuestMemory:
    """The memfd, its mapping in this process, and its KVM slots."""

    def __init__(self, size: int, name: str = "guest", regions: list[Region] | None = None,
                 fd: int | None = None) -> None:
        self.regions = regions or default_layout(size)
        self.size = sum(r.size for r in self.regions)
        if self.size != size:
            raise ValueError("memory regions do not add up to the memory size")
        if fd is None:
            self.fd = os.memfd_create(f"vmigrate:{name}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
        else:
            self.fd = fd
            if os.fstat(fd).st_size < size:
                raise ValueError("memory file is smaller than the guest's memory")
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self._slots: list[tuple[int, Region]] = []
        self._vm_fd: int | None = None
        self.dirty_logging = False

    @property
    def pages(self) -> int:
        return self.size // PAGE

    @property
    def base(self) -> int:
        """Address of the mapping in this process."""
        return self._base

    def proc_path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    # ---- KVM slots
    def register(self, vm_fd: int) -> None:
        self._vm_fd = vm_fd
        self._slots = list(enumerate(self.regions))
        for slot, region in self._slots:
            self._set_slot(slot, region, 0)

    def _set_slot(self, slot: int, region: Region, flags: int) -> None:
        assert self._vm_fd is not None
        r = kvm.UserspaceMemoryRegion()
        r.slot, r.flags = slot, flags
        r.guest_phys_addr, r.memory_size = region.guest_phys_addr, region.size
        r.userspace_addr = self._base + region.file_offset
        kvm.set_struct(self._vm_fd, kvm.KVM_SET_USER_MEMORY_REGION, r)

    def set_dirty_logging(self, on: bool) -> None:
        for slot, region in self._slots:
            self._set_slot(slot, region, kvm.MEM_LOG_DIRTY_PAGES if on else 0)
        self.dirty_logging = on

    def fetch_dirty_bitmap(self) -> np.ndarray:
        """Pages dirtied since the last fetch, as uint64 words over the file's pages."""
        words = (self.pages + 63) // 64
        out = np.zeros(words, dtype=np.uint64)
        assert self._vm_fd is not None
        for slot, region in self._slots:
            slot_pages = region.size // PAGE
            buf = np.zeros((slot_pages + 63) // 64, dtype=np.uint64)
            log = kvm.DirtyLog()
            log.slot = slot
            log.dirty_bitmap = buf.ctypes.data
            kvm.ioctl_buf(self._vm_fd, kvm.KVM_GET_DIRTY_LOG, log)
            first = region.file_offset // PAGE
            if first % 64 == 0:
                out[first // 64:first // 64 + len(buf)] |= buf
            else:  # regions start on GiB boundaries in practice; keep it correct anyway
                bits = np.unpackbits(buf.view(np.uint8), bitorder="little")[:slot_pages]
                all_bits = np.unpackbits(out.view(np.uint8), bitorder="little")
                all_bits[first:first + slot_pages] |= bits
                out = np.packbits(all_bits, bitorder="little").view(np.uint64)
        return out

    # ---- access from the VMM
    def gpa_to_offset(self, gpa: int, length: int = 1) -> int:
        for r in self.regions:
            if r.guest_phys_addr <= gpa and gpa + length <= r.guest_phys_addr + r.size:
                return r.file_offset + (gpa - r.guest_phys_addr)
        raise ValueError(f"guest-physical range {gpa:#x}+{length:#x} is not RAM")

    def write(self, gpa: int, data: bytes) -> None:
        off = self.gpa_to_offset(gpa, len(data))
        self.map[off:off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = self.gpa_to_offset(gpa, length)
        return self.map[off:off + length]

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes with the process
        os.close(self.fd)


def data_ranges(fd: int, size: int, start: int = 0) -> list[tuple[int, int]]:
    """(offset, length) of the parts of a file in [start, size) that were ever
    written (guest memory in a memfd, a checkpoint's memory image).

    Pages never touched are holes (tmpfs, most disk file systems) and are
    known to be zero without reading them (lseek SEEK_DATA/SEEK_HOLE).
    """
    out: list[tuple[int, int]] = []
    pos = start
    while pos < size:
        try:
            data = os.lseek(fd, pos, SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if data >= size:
            break
        end = min(os.lseek(fd, data, SEEK_HOLE), size)
        out.append((data, end - data))
        pos = end
    return out
