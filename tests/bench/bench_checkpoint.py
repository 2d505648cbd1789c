"""Checkpoint and restore: vmigrate beside QEMU's migrate-to-file on this machine.

    python tests/bench/bench_checkpoint.py [--sizes 256,1024] [--no-qemu]

Guests of 256 MiB and 1 GiB whose working set (a quarter of memory) was
written and is rewritten at 50 MiB/s. vmigrate: a live checkpoint (the guest
keeps running), the same into the mapped layout, then restores: the default
(memory read and checked before the guest runs) and --lazy (the guest runs at
once, memory follows). QEMU (tests/bench/qemu_peer.py, TCG, Linux guest with
the same workload): `migrate exec:cat > FILE` of the running guest and
`-incoming exec:cat FILE`. Prints file size, checkpoint time, guest pause and
restore time (request to the guest running again; every restored guest is
checked to run clean). Not a test: one run.
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
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vmigrate.vmm.testguest import report  # noqa: E402

VMIGRATE = [sys.executable, "-m", "vmigrate.cli.main"]
MIB = 1 << 20


class Local:
    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="vmc", dir="/tmp"))
        self.env = {**os.environ, "VMIGRATE_HOME": str(self.home)}

    def cli(self, *args: str) -> str:
        p = subprocess.run([*VMIGRATE, *args], env=self.env, capture_output=True, text=True,
                           timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"vmigrate {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def wait_running(self, name: str) -> None:
        """The restored guest prints heartbeats of its own, clean."""
        n0 = report.parse(self.cli("logs", name)).last(0)
        base = n0.n if n0 else 0
        deadline = time.monotonic() + 60
        while True:
            r = report.parse(self.cli("logs", name))
            if r.last(0) is not None and r.last(0).n > base + 1:
                if not r.clean():
                    raise RuntimeError(f"{name} is not clean: {r.problems[:2]}")
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} does not run")
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run([*VMIGRATE, "down"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.home, ignore_errors=True)


def run_vmigrate(mib: int) -> dict:
    c = Local()
    try:
        ws = mib // 4
        name = f"c{mib}"
        c.cli("run", name, "--test-guest", "--memory", f"{mib}M", "--working-set", f"{ws}M",
              "--dirty-rate", "50M", "--heartbeat-ms", "100")
        while (hb := report.parse(c.cli("logs", name)).last(0)) is None or hb.writes < ws * 256:
            time.sleep(0.2)
        out = {}
        for layout, extra in (("stream", []), ("mapped", ["--mapped"])):
            path = c.home / f"{name}.{layout}"
            r = json.loads(c.cli("checkpoint", name, str(path), "--json", *extra))
            out[layout] = {"file_mib": path.stat().st_size / MIB,
                           "on_disk_mib": path.stat().st_blocks * 512 / MIB,
                           "checkpoint_ms": r["total_ms"], "pause_ms": r["pause_ms"]}
        for label, path, extra in (("restore", "stream", []), ("restore lazy", "mapped",
                                                               ["--lazy"])):
            r = json.loads(c.cli("restore", str(c.home / f"{name}.{path}"), "--name",
                                 f"r{len(out)}", "--json", *extra))
            out[label] = {"restore_ms": r["restore_ms"]}
            c.wait_running(f"r{len(out) - 1}")
        return out
    finally:
        c.close()


def run_qemu(mib: int) -> dict:
    sys.path.insert(0, str(REPO / "tests" / "bench"))
    import qemu_peer

    return asdict(qemu_peer.run_checkpoint_restore(mib, "running", ws_mib=mib // 4,
                                                   rate_mibs=50))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    results = []
    for mib in (int(x) for x in opts.sizes.split(",")):
        v = run_vmigrate(mib)
        q = None if opts.no_qemu else run_qemu(mib)
        results.append((mib, v, q))
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| guest | | file MiB (on disk) | checkpoint ms | guest pause ms "
          "| restore ms (until the guest runs) |")
    print("|---|---|---|---|---|---|")
    for mib, v, q in results:
        s, m = v["stream"], v["mapped"]
        print(f"| {mib} MiB | vmigrate (zstd stream) | {s['file_mib']:.0f} | "
              f"{s['checkpoint_ms']:.0f} | {s['pause_ms']:.1f} | "
              f"{v['restore']['restore_ms']:.0f} |")
        print(f"| | vmigrate (mapped, lazy restore) | {m['file_mib']:.0f} "
              f"({m['on_disk_mib']:.0f}) | {m['checkpoint_ms']:.0f} | {m['pause_ms']:.1f} | "
              f"{v['restore lazy']['restore_ms']:.0f} |")
        if q:
            fmt = (lambda x: "-" if x is None else f"{x:.0f}")  # noqa: E731
            print(f"| | QEMU migrate to file | {fmt(q['file_bytes'] and q['file_bytes'] / MIB)} "
                  f"| {fmt(q['checkpoint_ms'])} | {fmt(q['pause_ms'])} | "
                  f"{fmt(q['restore_ms'])} |")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
