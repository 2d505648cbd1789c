"""Port I/O dispatch for the vCPU threads.

Ports nobody claims read as all ones and ignore writes, as on a PC with
nothing behind them; the first access to each is counted so `vmigrate ps`
can show what a guest probed.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

ReadFn = Callable[[int], int]          # offset -> value (one byte)
WriteFn = Callable[[int, int], None]    # offset, value


class IoBus:
    def __init__(self) -> None:
        self._ports: dict[int, tuple[int, ReadFn, WriteFn]] = {}
        self._lock = threading.Lock()
        self.unhandled_ports: Counter[int] = Counter()
        self.unhandled_mmio: Counter[int] = Counter()

    def register(self, base: int, count: int, read: ReadFn, write: WriteFn) -> None:
        for port in range(base, base + count):
            if port in self._ports:
                raise ValueError(f"port {port:#x} is already taken")
            self._ports[port] = (base, read, write)

    def read(self, port: int, size: int) -> int:
        value = 0
        for i in range(size):
            dev = self._ports.get(port + i)
            if dev is None:
                self._note(port + i)
                byte = 0xFF
            else:
                base, read, _ = dev
                byte = read(port + i - base) & 0xFF
            value |= byte << (8 * i)
        return value

    def write(self, port: int, size: int, value: int) -> None:
        for i in range(size):
            dev = self._ports.get(port + i)
            if dev is None:
                self._note(port + i)
                continue
            base, _, write = dev
            write(port + i - base, (value >> (8 * i)) & 0xFF)

    def _note(self, port: int) -> None:
        with self._lock:
            self.unhandled_ports[port] += 1

    def note_unhandled_mmio(self, addr: int, is_write: bool) -> None:
        with self._lock:
            self.unhandled_mmio[addr & ~0xFFF] += 1
