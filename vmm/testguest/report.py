"""Reading what the test guest says on its console.

Tests and tools use this to decide whether a guest came through a restore or
a migration intact: heartbeats that keep counting, no CORRUPT, CLOCK or FAULT
lines, and echoes of what was typed.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

_HB = re.compile(r"HB cpu=(\d+) n=(\d+) ticks=(\d+) w=(\d+) v=(\d+) err=(\d+) ns=(\d+)")
_BAD = re.compile(r"^(CORRUPT|CLOCK|FAULT)\b.*$", re.M)
_ECHO = re.compile(r"^ECHO (.*)$", re.M)


@dataclass(frozen=True)
class Heartbeat:
    cpu: int
    n: int
    ticks: int
    writes: int
    verified: int
    errors: int
    ns: int


@dataclass
class Report:
    heartbeats: dict[int, list[Heartbeat]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    echoes: list[str] = field(default_factory=list)

    def last(self, cpu: int = 0) -> Heartbeat | None:
        beats = self.heartbeats.get(cpu)
        return beats[-1] if beats else None

    @property
    def cpus(self) -> list[int]:
        return sorted(self.heartbeats)

    def gaps(self) -> list[str]:
        """Heartbeat counters that skipped or repeated (a restore that lost time or ran twice)."""
        out = []
        for cpu, beats in self.heartbeats.items():
            for a, b in itertools.pairwise(beats):
                if b.n != a.n + 1:
                    out.append(f"cpu {cpu}: heartbeat {a.n} followed by {b.n}")
                if b.writes < a.writes or b.ticks < a.ticks:
                    out.append(f"cpu {cpu}: counters went backwards after heartbeat {a.n}")
        return out

    def clean(self) -> bool:
        return not self.problems and not self.gaps() and all(
            hb.errors == 0 for beats in self.heartbeats.values() for hb in beats)


def parse(text: str) -> Report:
    """Parse complete lines only: a line still being printed is not evidence."""
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    r = Report()
    for m in _HB.finditer(text):
        hb = Heartbeat(*(int(g) for g in m.groups()))
        r.heartbeats.setdefault(hb.cpu, []).append(hb)
    r.problems = [m.group(0) for m in _BAD.finditer(text)]
    r.echoes = [m.group(1) for m in _ECHO.finditer(text)]
    return r


def parse_bytes(data: bytes) -> Report:
    return parse(data.decode("ascii", errors="replace"))
