"""The MC146818 real-time clock and its CMOS RAM (ports 0x70-0x71), new in
state version 2.

The guest's wall clock is the host's UTC plus an offset the guest can move
by writing the time registers; the offset travels with the guest, so its
clock reads the same after a migration (hosts keep UTC with NTP). Status
register C's interrupt flags and the periodic/alarm interrupt (IRQ 8) are
not modelled: no guest vmigrate runs needs them, and a guest that enables
them simply gets no interrupt. CMOS RAM bytes 0x0e-0x7f are plain storage.

A guest that never touched the RTC does not depend on it, so its state can
still be written as state version 1 for an older release; one that did
cannot (migrate/translate.py).
"""

from __future__ import annotations

import calendar
import threading
import time
from collections.abc import Callable

from vmigrate.proto import state_pb2

INDEX_PORT, DATA_PORT = 0x70, 0x71
SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D, CENTURY = 0x0A, 0x0B, 0x0C, 0x0D, 0x32
TIME_REGS = {SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY}
B_SET, B_24H, B_BINARY = 0x80, 0x02, 0x04
D_VALID = 0x80
NMI_DISABLE = 0x80


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _unbcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


class Rtc:
    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._lock = threading.Lock()
        self.cmos = bytearray(128)
        self.cmos[REG_A] = 0x26          # 32.768 kHz time base, 1024 Hz rate
        self.cmos[REG_B] = B_24H         # 24-hour, BCD
        self.cmos[REG_D] = D_VALID
        self.index = 0
        self.nmi_disabled = False
        self.offset_ns = 0               # guest wall clock minus host UTC
        self.used = False

    # ---- time
    def _guest_time(self) -> time.struct_time:
        return time.gmtime(self._now() + self.offset_ns / 1e9)

    def _encode(self, value: int) -> int:
        return value if self.cmos[REG_B] & B_BINARY else _bcd(value)

    def _decode(self, value: int) -> int:
        return value if self.cmos[REG_B] & B_BINARY else _unbcd(value)

    def _read_time_reg(self, reg: int) -> int:
        t = self._guest_time()
        if reg == HOURS:
            if self.cmos[REG_B] & B_24H:
                return self._encode(t.tm_hour)
            h12 = t.tm_hour % 12 or 12
            return self._encode(h12) | (0x80 if t.tm_hour >= 12 else 0)
        value = {SECONDS: t.tm_sec, MINUTES: t.tm_min, WEEKDAY: (t.tm_wday + 1) % 7 + 1,
                 DAY: t.tm_mday, MONTH: t.tm_mon, YEAR: t.tm_year % 100,
                 CENTURY: t.tm_year // 100}[reg]
        return self._encode(value)

    def _write_time_reg(self, reg: int, raw: int) -> None:
        """Set one field of the guest's clock; the others keep running."""
        t = self._guest_time()
        fields = {"sec": t.tm_sec, "min": t.tm_min, "hour": t.tm_hour, "mday": t.tm_mday,
                  "mon": t.tm_mon, "year": t.tm_year}
        if reg == HOURS:
            if self.cmos[REG_B] & B_24H:
                fields["hour"] = self._decode(raw & 0x7F)
            else:
                fields["hour"] = self._decode(raw & 0x7F) % 12 + (12 if raw & 0x80 else 0)
        elif reg == YEAR:
            fields["year"] = (t.tm_year // 100) * 100 + self._decode(raw)
        elif reg == CENTURY:
            fields["year"] = self._decode(raw) * 100 + t.tm_year % 100
        elif reg != WEEKDAY:          # the weekday follows from the date
            key = {SECONDS: "sec", MINUTES: "min", DAY: "mday", MONTH: "mon"}[reg]
            fields[key] = self._decode(raw)
        try:
            wanted = calendar.timegm((fields["year"], fields["mon"], fields["mday"],
                                      fields["hour"], fields["min"], fields["sec"], 0, 0, 0))
        except (ValueError, OverflowError):
            return                    # a nonsense date: ignore it, as a real RTC would misbehave
        self.offset_ns = int((wanted - self._now()) * 1e9)

    # ---- port I/O
    def read(self, offset: int) -> int:
        with self._lock:
            self.used = True
            if offset == 0:
                return self.index | (NMI_DISABLE if self.nmi_disabled else 0)
            reg = self.index
            if reg in TIME_REGS:
                return self._read_time_reg(reg)
            if reg == REG_C:
                value, self.cmos[REG_C] = self.cmos[REG_C], 0
                return value
            return self.cmos[reg]

    def write(self, offset: int, value: int) -> None:
        with self._lock:
            self.used = True
            if offset == 0:
                self.index = value & 0x7F
                self.nmi_disabled = bool(value & NMI_DISABLE)
                return
            reg = self.index
            if reg in TIME_REGS:
                self._write_time_reg(reg, value)
            elif reg == REG_A:
                self.cmos[REG_A] = value & 0x7F       # UIP is read-only
            elif reg in (REG_C, REG_D):
                return                                # read-only
            else:
                self.cmos[reg] = value

    # ---- state
    def save(self) -> state_pb2.RtcState:
        with self._lock:
            return state_pb2.RtcState(cmos=bytes(self.cmos), index=self.index,
                                      nmi_disabled=self.nmi_disabled, offset_ns=self.offset_ns,
                                      used=self.used)

    def restore(self, s: state_pb2.RtcState) -> None:
        with self._lock:
            if len(s.cmos) == 128:
                self.cmos = bytearray(s.cmos)
            self.index = s.index & 0x7F
            self.nmi_disabled = s.nmi_disabled
            self.offset_ns = s.offset_ns
            self.used = s.used
