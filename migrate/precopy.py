"""Pre-copy: copy guest memory while the guest runs, in rounds of dirty pages,
until what is left fits in the downtime budget.

Used by live migration (the sink is the network) and by live checkpoints (the
sink is a file). The loop decides the switchover from measured numbers: the
sink's throughput and the guest's dirty rate give the expected downtime of
stopping now; when rounds stop shrinking, the guest's vCPUs are throttled step
by step (auto-converge), and at the timeout the caller gives up with the guest
still running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vmigrate.migrate import pages
from vmigrate.migrate.errors import AgentError, Cancelled
from vmigrate.proto import agent_pb2
from vmigrate.vmm.client import VmmClient

PAGE = pages.PAGE


Tick = Callable[[], None]


class Sink(Protocol):
    """Where pages go: a file or the network. It encodes them itself (the
    network sink splits the work over several streams)."""

    counts: pages.Counts

    def send_pages(self, round_: int, bitmap: np.ndarray, skip_zero: bool, tick: Tick) -> int:
        """Deliver the pages set in `bitmap`, calling tick() after each batch;
        returns the encoded bytes delivered."""
        ...


def encode_batches(encoder: pages.Encoder, bitmap: np.ndarray, counts: pages.Counts,
                   skip_zero: bool, tick: Tick,
                   hashes: np.ndarray | None = None) -> Iterator[list[pages.Chunk]]:
    for batch in encoder.batches(bitmap, counts, skip_zero=skip_zero, hashes=hashes):
        yield batch
        tick()


@dataclass
class Policy:
    downtime_ms: float = 20.0         # budget for the stop-and-copy
    state_overhead_ms: float = 12.0   # pause+save, restore, commit, resume: measured here
    max_rounds: int = 30
    timeout_s: float = 0.0            # 0: no timeout
    auto_converge: bool = True
    throttle_initial: int = 20
    throttle_step: int = 10
    throttle_max: int = 99
    min_pages: int = 64               # always good enough to stop


@dataclass
class RoundResult:
    round: int
    pages: int
    bytes: int
    seconds: float
    dirty_pages_per_s: float
    throttle: int


@dataclass
class Precopy:
    """The state of one pre-copy, round after round."""

    vmm: VmmClient
    layout: pages.Layout
    sink: Sink
    policy: Policy
    cancel: threading.Event
    progress: Callable[[agent_pb2.Progress], None]
    rounds: list[RoundResult] = field(default_factory=list)
    throttle: int = 0
    bandwidth: float = 0.0            # encoded bytes per second into the sink
    guest_rate: float = 0.0           # guest pages per second through the pipeline
    started: float = field(default_factory=time.monotonic)
    bytes_sent: int = 0
    last_fetch: float = field(default_factory=time.monotonic)   # dirty log last emptied

    def _check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled by the user")
        if self.policy.timeout_s and time.monotonic() - self.started > self.policy.timeout_s:
            raise AgentError(f"did not converge within {self.policy.timeout_s:g} s "
                             f"(dirty rate {self._dirty_mib_s():.0f} MiB/s, "
                             f"throttle {self.throttle}%); the guest keeps running here")

    def _dirty_mib_s(self) -> float:
        return (self.rounds[-1].dirty_pages_per_s * PAGE / (1 << 20)) if self.rounds else 0.0

    @property
    def counts(self) -> pages.Counts:
        return self.sink.counts

    def send_round(self, round_: int, bitmap: np.ndarray, skip_zero: bool) -> RoundResult:
        t0 = time.monotonic()
        n = pages.count_pages(bitmap)
        before = pages.Counts()
        before.add(self.counts)
        sent = self.sink.send_pages(round_, bitmap, skip_zero, self._ticker(round_, n))
        dt = max(time.monotonic() - t0, 1e-6)
        self.bytes_sent += sent
        guest_bytes = (self.counts.pages - before.pages) * PAGE
        if guest_bytes >= (1 << 20):
            self.bandwidth = sent / dt if sent else self.bandwidth
            self.guest_rate = guest_bytes / PAGE / dt
        r = RoundResult(round_, n, sent, dt, 0.0, self.throttle)
        self.rounds.append(r)
        return r

    def _ticker(self, round_: int, total: int) -> Tick:
        """Called after every batch: honours cancel/timeout, reports progress."""
        done_pages = self.counts.pages
        last = [0.0]
        lock = threading.Lock()

        def tick() -> None:
            self._check()
            now = time.monotonic()
            with lock:
                if now - last[0] < 0.2:
                    return
                last[0] = now
            done = self.counts.pages - done_pages
            self.progress(agent_pb2.Progress(
                phase="precopy", round=round_, bytes_done=self.counts.pages * PAGE,
                bytes_remaining=max(0, total - done) * PAGE,
                throughput_bytes_per_s=self._throughput(), throttle_percent=self.throttle))
        return tick

    def _throughput(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.counts.pages * PAGE / elapsed if elapsed > 0 else 0.0

    def expected_downtime_ms(self, dirty_pages: int) -> float:
        rate = self.guest_rate or 1e5        # pages/s; a conservative guess before measuring
        return dirty_pages / rate * 1000 + self.policy.state_overhead_ms

    def run(self, first: np.ndarray, fresh_target: bool) -> np.ndarray:
        """Round 0 with `first`, then dirty rounds until it is time to stop.

        Returns the pages dirtied since the last round was fetched; the caller
        pauses the guest, fetches once more and sends the union.
        """
        self.send_round(0, first, skip_zero=fresh_target)
        round_ = 1
        prev_dirty: int | None = None
        stalls = 0
        while True:
            self._check()
            t_fetch = time.monotonic()
            bitmap = self.vmm.fetch_dirty_log()
            dirty = pages.count_pages(bitmap)
            last = self.rounds[-1]
            since = max(t_fetch - self.last_fetch, 1e-6)
            self.last_fetch = t_fetch
            last.dirty_pages_per_s = dirty / since
            expected = self.expected_downtime_ms(dirty)
            self.progress(agent_pb2.Progress(
                phase="precopy", round=round_, bytes_done=self.counts.pages * PAGE,
                bytes_remaining=dirty * PAGE, dirty_bytes_per_s=last.dirty_pages_per_s * PAGE,
                throughput_bytes_per_s=self._throughput(), expected_downtime_ms=expected,
                throttle_percent=self.throttle))
            if dirty <= self.policy.min_pages or expected <= self.policy.downtime_ms:
                return bitmap
            if round_ >= self.policy.max_rounds and not self.policy.auto_converge:
                return bitmap
            # Not converging: the guest dirties as fast as we copy.
            if prev_dirty is not None and dirty > prev_dirty * 0.8:
                stalls += 1
            else:
                stalls = 0
            if stalls >= 1 and self.policy.auto_converge:
                self._throttle_up(last.dirty_pages_per_s)
                stalls = 0
            prev_dirty = dirty
            self.send_round(round_, bitmap, skip_zero=False)
            round_ += 1

    def _throttle_up(self, dirty_pages_per_s: float) -> None:
        """Throttle harder: at least one step more, and straight to the share
        that brings the guest's dirty rate to half the copy rate when the
        measured rates say so (QEMU steps 10 % at a time; on a guest that
        dirties three times faster than the link that wastes many rounds)."""
        p = self.policy
        step = p.throttle_initial if self.throttle == 0 else self.throttle + p.throttle_step
        wanted = 0
        if self.guest_rate and dirty_pages_per_s:
            # the rate seen was already throttled by self.throttle %: unthrottled it is
            unthrottled = dirty_pages_per_s / max(0.01, 1 - self.throttle / 100)
            wanted = int(100 * (1 - 0.5 * self.guest_rate / unthrottled))
        new = min(p.throttle_max, max(step, wanted))
        if new != self.throttle:
            self.throttle = new
            self.vmm.set_throttle(new)

    def release_throttle(self) -> None:
        if self.throttle:
            self.throttle = 0
            self.vmm.set_throttle(0)
