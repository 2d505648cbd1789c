"""Deciding, while a migration runs, whether compressing pages pays.

Compression pays only when the link, not the CPU, limits the transfer: zstd
level -1 costs about as much CPU per byte as gRPC itself on these machines
(../shared/PERF-NOTES.md), so on a fast link it slows everything down, and on
a slow one it multiplies the throughput by the compression ratio. Where the
balance lies depends on the link, the guest's memory and how busy the CPUs
are, so the governor does not guess: it tries. The streams send a window raw
(16 MiB or half a second) and a window compressed, compare the guest bytes
per second each achieved, and keep the better one (zstd must win by 25 %).
Gaps between rounds are not counted. A --bandwidth cap below 250 MB/s skips
the trial and starts compressed.
"""

from __future__ import annotations

import threading
import time

from vmigrate.migrate import pages

WARMUP_BYTES = 16 << 20          # measure the link over this much before deciding
SWITCH_MARGIN = 1.25             # the other choice must be this much better
IDLE_GAP_S = 0.2                 # a pause longer than this (between rounds) restarts a window


class CompressionGovernor:
    def __init__(self, encoders: list[pages.Encoder], mode: str, bandwidth_cap: int,
                 level: int = pages.ZSTD_LEVEL) -> None:
        self.encoders = encoders
        self.mode = mode                 # "auto", "off" or a zstd level
        self.level = level
        self._lock = threading.Lock()
        self._wire = 0
        self._guest = 0
        self._since = time.monotonic()
        self._last = self._since
        self.decisions: list[str] = []
        self.rates: dict[str, float] = {}        # guest bytes/s measured raw and zstd
        self.trial: str | None = None            # the window being measured
        if mode not in ("auto", "off"):
            self._set(True)
        elif mode == "auto" and bandwidth_cap and bandwidth_cap < 250_000_000:
            self._set(True)
            self.decisions.append("zstd (a --bandwidth cap)")
        elif mode == "auto":
            self._start_trial("raw")

    @property
    def compressing(self) -> bool:
        return self.encoders[0].compress if self.encoders else False

    def _set(self, on: bool) -> None:
        for e in self.encoders:
            e.compress = on

    def _start_trial(self, what: str) -> None:
        self.trial = what
        self._set(what == "zstd")
        self._wire = self._guest = 0
        self._since = time.monotonic()

    def observe(self, wire_bytes: int, guest_bytes: int) -> None:
        """A frame went out: count it; close a trial window or watch the rate."""
        if self.mode != "auto":
            return
        with self._lock:
            now = time.monotonic()
            if now - self._last > IDLE_GAP_S:        # a new round: do not count the gap
                self._wire = self._guest = 0
                self._since = now
            self._last = now
            if self.trial is None:
                return
            self._wire += wire_bytes
            self._guest += guest_bytes
            elapsed = now - self._since
            if self._guest < WARMUP_BYTES and elapsed < 0.5:
                return
            rate = self._guest / max(elapsed, 1e-6)
            wire_rate = self._wire / max(elapsed, 1e-6)
            self._wire = self._guest = 0
            self._since = time.monotonic()
            if self.trial == "raw":
                self.rates["raw"] = rate
                self._start_trial("zstd")
            elif self.trial == "zstd":
                self.rates["zstd"] = rate
                self.trial = None
                zstd_wins = rate > self.rates["raw"] * SWITCH_MARGIN
                self._set(zstd_wins)
                self.decisions.append(
                    f"{'zstd' if zstd_wins else 'raw'}: {self.rates['raw'] / 1e6:.0f} MB/s "
                    f"raw vs {rate / 1e6:.0f} MB/s zstd, wire {wire_rate / 1e6:.0f} MB/s")

    def summary(self) -> str:
        if self.mode == "off":
            return "off"
        if self.mode != "auto":
            return f"zstd level {self.mode}"
        final = "zstd" if self.compressing else "raw"
        return f"{final} (auto: {'; '.join(self.decisions) or 'not enough data to try'})"
