"""Reading the workload's console output (the format is defined in workload.c)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PAGE_SIZE = 4096

_HB = re.compile(r"HB n=(\d+) w=(\d+) errors=(\d+)(?: passes=(\d+))?")
_CORRUPT = re.compile(r"CORRUPT page=\d+ expected=[0-9a-fA-F]+ found=[0-9a-fA-F]+.*")
# Kernel or user-space crashes the guest kernel reports on its console.
_CRASH = re.compile(
    r"Kernel panic|BUG: |Oops: |general protection fault|invalid opcode|segfault at"
    r"|traps: |workload exited with status [^0]"
)


@dataclass(frozen=True)
class Heartbeat:
    n: int  # heartbeat counter (once a second of guest time)
    written: int  # pages written since the workload started
    errors: int  # corrupted pages seen so far
    passes: int  # complete verification passes over the working set


@dataclass
class ConsoleReport:
    heartbeats: list[Heartbeat] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # the CORRUPT lines, verbatim
    crashes: list[str] = field(default_factory=list)  # panic/Oops/segfault lines, verbatim

    @property
    def errors(self) -> int:
        """Corruptions the guest counted (its own counter, or the CORRUPT lines seen)."""
        counted = self.heartbeats[-1].errors if self.heartbeats else 0
        return max(counted, len(self.corrupt))

    def dirty_rate(self, first: int = 0, last: int = -1) -> float | None:
        """Bytes per second the guest rewrote between two heartbeats (by index)."""
        if len(self.heartbeats) < 2:
            return None
        a, b = self.heartbeats[first], self.heartbeats[last]
        if b.n <= a.n:
            return None
        return (b.written - a.written) * PAGE_SIZE / (b.n - a.n)


def parse_console(text: str) -> ConsoleReport:
    """Heartbeats and CORRUPT lines from console text (complete lines only)."""
    report = ConsoleReport()
    complete = text[: text.rfind("\n") + 1]
    for line in complete.splitlines():
        if m := _HB.search(line):
            n, w, e, p = m.groups()
            report.heartbeats.append(Heartbeat(int(n), int(w), int(e), int(p or 0)))
        elif m := _CORRUPT.search(line):
            report.corrupt.append(m.group(0).strip())
        elif _CRASH.search(line):
            report.crashes.append(line.strip())
    return report
