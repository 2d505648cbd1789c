"""The VMM alone: save and restore times by guest size, and how the test guest runs.

    python tests/bench/bench_vmm.py [--sizes 16,64,256,1024]

For each size (MiB) a test guest (working set half its memory, 64 MiB/s, one
vCPU) runs in a real VMM process; then: pause, save the complete state (one
call), copy its memory into a fresh VMM process, restore, resume. Prints the
times, the state size, the guest's exits per second and the dirty rate it
achieved (from its own heartbeats). Not a test: one run, no thresholds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.guests import GuestProcess, copy_memory, guest_config  # noqa: E402
from vmigrate.vmm.testguest import report  # noqa: E402


def measure(root: Path, mib: int) -> dict:
    cfg = guest_config(name=f"b{mib}", memory_mib=mib, working_set_mib=max(1, mib // 2),
                       rate_mib_s=64, heartbeat_ms=250)
    src = GuestProcess(root / f"a{mib}", cfg)
    dst = None
    try:
        src.client.boot()
        src.wait_heartbeats(2)
        e0, t0 = src.client.status().exits, time.monotonic()
        r0 = src.report().last(0)
        time.sleep(2.0)
        e1, t1 = src.client.status().exits, time.monotonic()
        r1 = src.report().last(0)
        exits_per_s = (e1 - e0) / (t1 - t0)
        dirty = (r1.writes - r0.writes) * 4096 / ((r1.ns - r0.ns) / 1e9)
        src.client.start_dirty_log()
        t = time.perf_counter()
        paused = src.client.pause_and_save("checkpoint")
        pause_save_ms = (time.perf_counter() - t) * 1000
        before = src.console()
        dst = GuestProcess(root / f"b{mib}", cfg)
        t = time.perf_counter()
        copy_memory(src.client, dst.client)
        copy_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        dst.client.restore(paused.state)
        dst.client.resume()
        restore_ms = (time.perf_counter() - t) * 1000
        n = report.parse_bytes(before).last(0).n
        rep = dst.wait_heartbeats(2, after=n)
        return {"mib": mib, "pause_ms": paused.pause_ms, "save_ms": paused.save_ms,
                "pause_save_call_ms": pause_save_ms,
                "state_bytes": paused.state.ByteSize(), "copy_ms": copy_ms,
                "restore_ms": restore_ms, "exits_per_s": exits_per_s,
                "dirty_mib_s": dirty / (1 << 20), "clean": rep.clean()}
    finally:
        src.close()
        if dst is not None:
            dst.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,64,256,1024")
    opts = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vmv", dir="/tmp"))
    rows = []
    try:
        for mib in (int(x) for x in opts.sizes.split(",")):
            rows.append(measure(root, mib))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| memory | pause ms | save ms | state KiB | memory copy ms | restore+resume ms "
          "| exits/s | dirty MiB/s (asked 64) | guest after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mib']} MiB | {r['pause_ms']:.2f} | {r['save_ms']:.2f} | "
              f"{r['state_bytes'] / 1024:.1f} | {r['copy_ms']:.0f} | {r['restore_ms']:.1f} | "
              f"{r['exits_per_s']:.0f} | {r['dirty_mib_s']:.1f} | "
              f"{'clean' if r['clean'] else 'NOT CLEAN'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
