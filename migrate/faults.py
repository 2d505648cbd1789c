"""Hold points: where an agent can be told to wait, so tests can break it at
a chosen phase of a migration (kill a process, cut the network) and check
that exactly one copy of the guest survives (tests/test_faults.py).

    VMIGRATE_HOLD="source:stop-and-copy=3,destination:commit=2"

makes the source agent wait 3 s right after pausing the guest and the
destination wait 2 s right after the store commit, before it runs the guest.
Points: source: negotiate, precopy, stop-and-copy; destination: prepare,
switchover (state restored, not committed), commit (committed, not running).
Nothing waits unless the variable is set; it is read once, at import.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("vmigrate.faults")

POINTS = {
    "source": ("negotiate", "precopy", "stop-and-copy"),
    "destination": ("prepare", "switchover", "commit"),
}


def _parse(spec: str) -> dict[tuple[str, str], float]:
    holds: dict[tuple[str, str], float] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, seconds = item.partition("=")
        side, _, point = where.partition(":")
        if point not in POINTS.get(side, ()):
            raise ValueError(f"VMIGRATE_HOLD: unknown hold point {where!r}")
        holds[(side, point)] = float(seconds or "1")
    return holds


_HOLDS = _parse(os.environ.get("VMIGRATE_HOLD", ""))


def hold(side: str, point: str) -> None:
    seconds = _HOLDS.get((side, point))
    if seconds:
        log.warning("holding %.1f s at %s:%s (VMIGRATE_HOLD)", seconds, side, point)
        time.sleep(seconds)
