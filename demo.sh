#!/usr/bin/env bash
# The main job, from a fresh Debian machine: set everything up, start a local
# two-host cluster, boot the self-checking test guest on host1, live-migrate it
# to host2 while it dirties memory, and show that it kept running intact.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "vmigrate up: agents host1 and host2 on this machine (mutual TLS)"
vmigrate up --hosts 2
vmigrate hosts

say "boot the test guest on host1: 256 MiB, rewriting 64 MiB at 32 MiB/s, 2 vCPUs"
vmigrate stop demo >/dev/null 2>&1 || true
vmigrate run demo --test-guest --on host1 --memory 256M --working-set 64M \
    --dirty-rate 32M --vcpus 2 --heartbeat-ms 250
sleep 3
vmigrate logs demo --tail 200

say "vmigrate send host2 demo: live migration while the guest runs"
vmigrate send host2 demo
vmigrate ps

say "the guest on host2: heartbeats keep counting, its self-check stays clean"
sleep 2
vmigrate logs demo --tail 400
python3 - <<'PY'
import subprocess, sys

from vmigrate.vmm.testguest import report
r = report.parse(subprocess.run(["vmigrate", "logs", "demo"], capture_output=True,
                                text=True, check=True).stdout)
host = [l for l in subprocess.run(["vmigrate", "ps"], capture_output=True, text=True,
                                  check=True).stdout.splitlines() if l.startswith("demo ")]
ok = r.clean() and all(len(b) > 8 for b in r.heartbeats.values()) and "host2" in host[0]
print(f"\nguest: {sum(len(b) for b in r.heartbeats.values())} heartbeats on "
      f"{len(r.heartbeats)} vCPUs, gaps {r.gaps() or 'none'}, problems {r.problems or 'none'}")
print("demo OK: the guest moved to host2 without losing a beat" if ok else "demo FAILED")
sys.exit(0 if ok else 1)
PY
say "explore: vmigrate ps | vmigrate send host1 demo | vmigrate checkpoint demo /tmp/demo.ckpt | vmigrate down"
