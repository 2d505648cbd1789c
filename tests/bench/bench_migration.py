"""Live migration: vmigrate beside QEMU on this machine, same scenarios.

    python tests/bench/bench_migration.py [--scenario NAME ...] [--no-qemu] [--json FILE]

vmigrate moves its built-in test guest between two agents of a local cluster
(`vmigrate up`, mutual TLS, loopback); QEMU (Debian's, TCG: KVM here cannot
run a guest's user space) moves a Linux guest whose workload rewrites and
verifies its working set the same way (tests/bench/qemu_peer.py), with its
bandwidth cap lifted. Scenarios (1 GiB guests, 1 vCPU):

    idle       256 MiB written once, then only read
    ws256-50   256 MiB rewritten at 50 MiB/s
    ws256-200  256 MiB rewritten at 200 MiB/s
    ws512-800  512 MiB rewritten at 800 MiB/s (does not converge unthrottled)

Prints one table with both and their ratios. Not a test: timings on shared
machines are noisy, so it reports one run's ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vmigrate.vmm.testguest import report  # noqa: E402

VMIGRATE = [sys.executable, "-m", "vmigrate.cli.main"]
MIB = 1 << 20


@dataclass
class Scenario:
    name: str
    ws_mib: int
    rate_mibs: int
    fill_once: bool = False
    memory_mib: int = 1024
    timeout_s: float = 120


SCENARIOS = {s.name: s for s in (
    Scenario("idle", 256, 1024, fill_once=True),
    Scenario("ws256-50", 256, 50),
    Scenario("ws256-200", 256, 200),
    Scenario("ws512-800", 512, 800),
)}


@dataclass
class Result:
    scenario: str
    status: str = "not run"
    total_ms: float | None = None
    downtime_ms: float | None = None
    wire_bytes: int | None = None
    guest_bytes: int | None = None
    rounds: int | None = None
    throttle: int | None = None
    setup_ms: float | None = None
    effective_gbs: float | None = None      # guest memory covered per second of migration
    clean: bool | None = None
    detail: str = ""
    steps: dict = field(default_factory=dict)


class Cluster:
    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="vmb", dir="/tmp"))
        self.env = {**os.environ, "VMIGRATE_HOME": str(self.home)}
        self.cli("up", "--hosts", "2")

    def cli(self, *args: str, check: bool = True, timeout: float = 300) -> str:
        p = subprocess.run([*VMIGRATE, *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"vmigrate {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def close(self) -> None:
        self.cli("down", check=False)
        shutil.rmtree(self.home, ignore_errors=True)


def run_vmigrate(c: Cluster, s: Scenario) -> Result:
    r = Result(s.name)
    name = f"b{s.name.replace('-', '')}"
    args = ["run", name, "--test-guest", "--on", "host1", "--memory", f"{s.memory_mib}M",
            "--working-set", f"{s.ws_mib}M", "--dirty-rate", f"{s.rate_mibs}M",
            "--heartbeat-ms", "250"]
    if s.fill_once:
        args.append("--fill-once")
    c.cli(*args)
    try:
        pages = s.ws_mib * 256
        deadline = time.monotonic() + 60
        while True:                                   # the working set written once
            hb = report.parse(c.cli("logs", name)).last(0)
            if hb is not None and hb.writes >= pages:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the guest did not fill its working set")
            time.sleep(0.25)
        time.sleep(1.0)
        before = report.parse(c.cli("logs", name)).last(0).n
        out = c.cli("send", "host2", name, "--json", "--timeout", str(s.timeout_s),
                    check=False, timeout=s.timeout_s + 60)
        if not out.strip():
            r.status = "failed"
            r.detail = "send failed"
            return r
        m = json.loads(out)
        r.status = m["outcome"]
        r.total_ms, r.downtime_ms = m["total_ms"], m["downtime_ms"]
        r.wire_bytes, r.guest_bytes = int(m["bytes_on_wire"]), int(m["guest_bytes"])
        r.rounds, r.throttle = len(m["rounds"]), int(m.get("max_throttle_percent", 0))
        r.setup_ms, r.steps = m["setup_ms"], m.get("downtime_steps", {})
        r.effective_gbs = s.memory_mib * MIB / (r.total_ms / 1000) / 1e9
        time.sleep(1.5)
        rep = report.parse(c.cli("logs", name))
        r.clean = rep.clean() and rep.last(0).n > before
        if not r.clean:
            r.detail = f"guest: {rep.problems[:2]} {rep.gaps()[:2]}"
    finally:
        c.cli("stop", name, check=False)
    return r


def run_qemu(s: Scenario) -> dict:
    sys.path.insert(0, str(REPO / "tests" / "bench"))
    import qemu_peer

    res = qemu_peer.run_live_migration(s.name, "fast")
    return asdict(res)


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def table(rows: list[tuple[Result, dict | None]]) -> str:
    lines = ["| scenario | | total ms | downtime ms | wire MiB | GB/s (memory/total) | rounds "
             "| throttle % | guest after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v, q in rows:
        wire = v.wire_bytes and v.wire_bytes / MIB
        lines.append(f"| {v.scenario} | vmigrate | {_fmt(v.total_ms)} | "
                     f"{_fmt(v.downtime_ms, '.1f')} | {_fmt(wire)} | "
                     f"{_fmt(v.effective_gbs, '.2f')} | {v.rounds or '-'} | {v.throttle or 0} | "
                     f"{'clean' if v.clean else (v.detail or v.status)} |")
        if q is None:
            continue
        qt, qd = q.get("total_time_ms"), q.get("pause_ms") or q.get("downtime_ms")
        qw = q.get("transferred_bytes")
        eff = 1024 * MIB / (qt / 1000) / 1e9 if qt else None
        g = q.get("guest", {})
        after = "ok" if g.get("ok") else ("CRASHED" if g.get("crashes") else
                                          (q.get("status") or "?"))
        lines.append(f"| | QEMU (cap lifted) | {_fmt(qt)} | {_fmt(qd, '.1f')} | "
                     f"{_fmt(qw and qw / MIB)} | {_fmt(eff, '.2f')} | "
                     f"{q.get('dirty_sync_count') or '-'} | {q.get('max_throttle_pct') or 0} | "
                     f"{after} |")
        lines.append(f"| | vmigrate / QEMU | {_ratio(v.total_ms, qt)} | "
                     f"{_ratio(v.downtime_ms, qd)} | {_ratio(v.wire_bytes, qw)} | | | | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    ap.add_argument("--no-qemu", action="store_true", help="vmigrate only")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    opts = ap.parse_args()
    names = opts.scenario or list(SCENARIOS)
    c = Cluster()
    rows: list[tuple[Result, dict | None]] = []
    try:
        for n in names:
            print(f"vmigrate: {n} ...", file=sys.stderr, flush=True)
            rows.append((run_vmigrate(c, SCENARIOS[n]), None))
    finally:
        c.close()
    if not opts.no_qemu:
        for i, n in enumerate(names):
            print(f"QEMU: {n} ...", file=sys.stderr, flush=True)
            try:
                rows[i] = (rows[i][0], run_qemu(SCENARIOS[n]))
            except Exception as e:  # report it in the table, keep going
                rows[i] = (rows[i][0], {"status": f"error: {e}"})
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    print(table(rows))
    for v, _ in rows:
        if v.steps:
            print(f"{v.scenario} downtime steps (ms): " +
                  ", ".join(f"{k} {x:.1f}" for k, x in sorted(v.steps.items())))
    if opts.json:
        opts.json.write_text(json.dumps([{"vmigrate": asdict(v), "qemu": q} for v, q in rows],
                                        indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
