#!/usr/bin/env python3
"""Soak: many live migrations back and forth of one running test guest.

A two-host cluster of network namespaces (tests/netns.py, mutual TLS, as the
tests use), one test guest that keeps rewriting its working set, and N
migrations host1 -> host2 -> host1 ... (default 1000). Every `--every`
migrations (default 50) it samples the memory of both agents and of the
guest's current VMM (VmRSS and RssAnon from /proc/PID/status; a VMM's VmRSS
includes the guest memory it maps, RssAnon is its own heap) and checks the
guest's own verdict: heartbeats counting on without a gap, no CORRUPT, CLOCK or
FAULT line, zero verification errors. At the end it prints a table: rate,
downtime, and each process's memory at the start, after warm-up, at the end
and at its peak.

    python tests/bench/soak.py                 # 1000 migrations (~20 min here)
    python tests/bench/soak.py --quick         # 30 migrations, sampled every 10 (CI)
    python tests/bench/soak.py --json          # machine-readable result on stdout

Exit status 0 only if every migration succeeded and the guest stayed clean.
Needs root (network namespaces) and /dev/kvm. Not collected by pytest;
tests/test_soak_quick.py runs --quick.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repo, for tests.*

from tests.cluster import NetnsCluster
from vmigrate.proto import agent_pb2
from vmigrate.vmm.testguest import report

MIB = 1 << 20


@dataclass
class Sample:
    """Memory of the watched processes after `migrations` migrations."""

    migrations: int
    seconds: float
    rss: dict[str, int]             # process label -> VmRSS bytes
    anon: dict[str, int]            # process label -> RssAnon bytes
    heartbeat: int
    clean: bool


@dataclass
class Result:
    migrations: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    downtime_ms: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # what the guest reported

    @property
    def clean(self) -> bool:
        return not self.problems and all(s.clean for s in self.samples)

    @property
    def per_minute(self) -> float:
        return self.migrations / self.seconds * 60 if self.seconds else 0.0

    def growth(self, label: str, anon: bool = False, warmup: int = 1) -> int:
        """Bytes the process grew from the sample after warm-up to the last one."""
        series = [(s.anon if anon else s.rss).get(label) for s in self.samples]
        series = [v for v in series if v is not None]
        if len(series) < 2:
            return 0
        return series[-1] - series[min(warmup, len(series) - 1)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(clean=self.clean, per_minute=self.per_minute,
                 growth={label: {"rss": self.growth(label), "anon": self.growth(label, True)}
                         for label in (self.samples[0].rss if self.samples else {})})
        return d


def status_of(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes, or (0, 0) if the process is gone."""
    rss = anon = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "VmRSS":
                rss = int(value.split()[0]) * 1024
            elif key == "RssAnon":
                anon = int(value.split()[0]) * 1024
    except OSError:
        pass
    return rss, anon


class Soak:
    def __init__(self, cluster: NetnsCluster, name: str) -> None:
        self.c = cluster
        self.name = name
        from vmigrate.cli.main import Session

        os.environ["VMIGRATE_HOME"] = str(cluster.home)
        self.session = Session()
        self.t0 = time.monotonic()
        self.last_n = 0

    def where(self) -> str:
        return self.session.store.get_vm(self.name).owner

    def vm_pid(self, host: str) -> int:
        return self.session.agent(host).GetVm(agent_pb2.VmRef(name=self.name), timeout=30).pid

    def console(self, host: str) -> report.Report:
        chunks = self.session.agent(host).ReadConsole(
            agent_pb2.ReadConsoleRequest(name=self.name), timeout=30)
        return report.parse_bytes(b"".join(c.data for c in chunks))

    def migrate(self, dest: str) -> agent_pb2.MigrationReport:
        src = self.where()
        last = agent_pb2.Progress()
        for p in self.session.agent(src).Send(agent_pb2.SendRequest(
                name=self.name, destination=dest), timeout=300):
            last = p
        return last.migration

    def sample(self, migrations: int) -> Sample:
        host = self.where()
        rss, anon = {}, {}
        for h in self.c.hosts:
            rss[f"agent {h}"], anon[f"agent {h}"] = status_of(self.c.agent_pid(h))
        rss["guest VMM"], anon["guest VMM"] = status_of(self.vm_pid(host))
        r = self.console(host)
        hb = r.last(0)
        n = hb.n if hb is not None else 0
        clean = r.clean() and n > self.last_n
        self.last_n = n
        return Sample(migrations, time.monotonic() - self.t0, rss, anon, n, clean)


def run(migrations: int, every: int, guest: list[str], say: bool) -> Result:
    home = Path(tempfile.mkdtemp(prefix="vmsk", dir="/tmp"))
    result = Result()
    cluster = NetnsCluster(home, hosts=2)
    try:
        name = "soak"
        cluster.run("run", name, "--test-guest", "--on", "host1", *guest)
        cluster.wait_heartbeats(name, 3)
        soak = Soak(cluster, name)
        result.samples.append(soak.sample(0))
        t0 = time.monotonic()
        hosts = list(cluster.hosts)
        for i in range(migrations):
            dest = hosts[(i + 1) % 2]
            try:
                r = soak.migrate(dest)
                result.downtime_ms.append(r.downtime_ms)
            except Exception as e:
                result.failures.append(f"migration {i + 1} to {dest}: {e}")
                if len(result.failures) > 5:
                    break
            result.migrations = i + 1
            if (i + 1) % every == 0 or i + 1 == migrations:
                result.seconds = time.monotonic() - t0
                s = soak.sample(i + 1)
                result.samples.append(s)
                if say:
                    print(f"  {i + 1:5d} migrations  {result.per_minute:6.1f}/min  "
                          + "  ".join(f"{k} {v / MIB:.0f}M" for k, v in s.rss.items())
                          + f"  heartbeat {s.heartbeat} {'clean' if s.clean else 'NOT CLEAN'}",
                          file=sys.stderr, flush=True)
        result.seconds = time.monotonic() - t0
        final = soak.console(soak.where())
        result.problems = final.problems[:5] + final.gaps()[:5]
        soak.session.close()
    finally:
        cluster.close()
        shutil.rmtree(home, ignore_errors=True)
    return result


def table(r: Result) -> str:
    lines = [f"soak: {r.migrations} migrations in {r.seconds / 60:.1f} min "
             f"({r.per_minute:.1f}/min), {len(r.failures)} failed, guest "
             f"{'clean' if r.clean else 'NOT CLEAN: ' + '; '.join(r.problems)}"]
    if r.downtime_ms:
        d = sorted(r.downtime_ms)
        lines.append(f"downtime ms: median {statistics.median(d):.1f}, "
                     f"p99 {d[min(len(d) - 1, int(len(d) * 0.99))]:.1f}, max {d[-1]:.1f}")
    if r.samples:
        warm = r.samples[min(1, len(r.samples) - 1)]
        rows = [("process", "start", f"after {warm.migrations}", "end", "max",
                 "growth since warm-up", "RssAnon start/end")]
        for label in r.samples[0].rss:
            series = [s.rss[label] for s in r.samples]
            anon = [s.anon[label] for s in r.samples]
            rows.append((label, f"{series[0] / MIB:.1f}M", f"{warm.rss[label] / MIB:.1f}M",
                         f"{series[-1] / MIB:.1f}M", f"{max(series) / MIB:.1f}M",
                         f"{r.growth(label) / MIB:+.1f}M",
                         f"{anon[0] / MIB:.1f}M / {anon[-1] / MIB:.1f}M"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    for f in r.failures[:5]:
        lines.append(f"failed: {f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--migrations", type=int, default=1000)
    ap.add_argument("--every", type=int, default=50, help="sample every N migrations")
    ap.add_argument("--quick", action="store_true", help="30 migrations, sampled every 10")
    ap.add_argument("--memory", default="128M")
    ap.add_argument("--working-set", default="32M")
    ap.add_argument("--dirty-rate", default="16M")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    a = ap.parse_args(argv)
    if a.quick:
        a.migrations, a.every = 30, 10
    guest = ["--memory", a.memory, "--working-set", a.working_set, "--dirty-rate", a.dirty_rate,
             "--heartbeat-ms", "200"]
    r = run(a.migrations, a.every, guest, say=not a.json)
    if a.json:
        print(json.dumps(r.to_dict(), indent=1))
    else:
        print(table(r))
    return 0 if r.clean and not r.failures else 1


if __name__ == "__main__":
    sys.exit(main())
