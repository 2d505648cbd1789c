"""Can this host's KVM run an unmodified guest's user space?

Ordinary operating systems enter their kernel from user processes with
`syscall`. On some hosts (nested or software virtualization such as PVM) a
guest's `syscall` from CPL3 never reaches the guest kernel, so Linux boots but
its first process dies. The probe boots the test guest in probe mode, which
executes one `syscall` at CPL3 and reports where it landed; it answers in
milliseconds. The result is cached per boot of the host.

    python -m vmigrate.vmm.probe      # prints {"ok": ..., "detail": ...}
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

PROBE_PORT = 0x502
CACHE_NAME = "user-space-probe.json"
TIMEOUT_S = 10.0


def run_probe() -> tuple[bool, str]:
    """Run the probe guest in this process (needs the main thread for signals)."""
    from vmigrate.proto import state_pb2 as pb
    from vmigrate.vmm import kvm
    from vmigrate.vmm.machine import Machine, MachineError, MachineState, install_kick_handler
    from vmigrate.vmm.testguest.layout import TestGuestParams

    install_kick_handler()
    result = threading.Event()
    try:
        m = Machine(pb.VmConfig(name="probe", memory_bytes=4 << 20, vcpu_count=1))
    except (kvm.KvmError, MachineError) as e:
        return False, str(e)
    try:
        m.bus.register(PROBE_PORT, 1, lambda _o: 0, lambda _o, _v: result.set())
        m.boot_test_guest(TestGuestParams(memory_bytes=4 << 20, vcpus=1, working_set_bytes=0,
                                          dirty_rate_bytes_per_s=0, probe_syscall=True))
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if result.wait(0.01):
                return True, "a guest's syscall from user mode reaches its kernel"
            if m.state == MachineState.CRASHED:
                return False, ("a guest's syscall from user mode does not reach its kernel "
                               f"({m.detail.split(';')[0]}): this host's KVM cannot run an "
                               "unmodified guest's processes")
        return False, "the probe guest did not answer"
    finally:
        m.close()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def cached_result(state_dir: Path) -> tuple[bool, str]:
    """The probe's answer for this boot of the host, running it once if needed."""
    cache = state_dir / CACHE_NAME
    boot = _boot_id()
    try:
        data = json.loads(cache.read_text())
        if data.get("boot_id") == boot:
            return bool(data["ok"]), str(data["detail"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        out = subprocess.run([sys.executable, "-P", "-m", "vmigrate.vmm.probe"],
                             capture_output=True, text=True, timeout=TIMEOUT_S + 20, cwd="/")
        data = json.loads(out.stdout.strip().splitlines()[-1])
        ok, detail = bool(data["ok"]), str(data["detail"])
    except (subprocess.TimeoutExpired, ValueError, IndexError, KeyError, OSError) as e:
        return False, f"the user-space probe failed to run: {e}"
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"boot_id": boot, "ok": ok, "detail": detail}))
    tmp.replace(cache)
    return ok, detail


if __name__ == "__main__":
    ok, detail = run_probe()
    print(json.dumps({"ok": ok, "detail": detail}))
    sys.exit(0)
