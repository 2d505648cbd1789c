"""Helpers for tests that run the built-in test guest in real VMM processes."""

from __future__ import annotations

import time
from pathlib import Path

from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm.client import MappedMemory, VmmClient, kill_vmm, spawn_vmm
from vmigrate.vmm.memory import data_ranges
from vmigrate.vmm.testguest import report

MIB = 1 << 20


def guest_config(name: str = "vm", memory_mib: int = 32, working_set_mib: int = 8,
                      rate_mib_s: float = 4, vcpus: int = 1,
                      heartbeat_ms: int = 200) -> pb.VmConfig:
    return pb.VmConfig(
        name=name, memory_bytes=memory_mib * MIB, vcpu_count=vcpus,
        test_guest=pb.TestGuestConfig(working_set_bytes=working_set_mib * MIB,
                                      dirty_rate_bytes_per_s=int(rate_mib_s * MIB),
                                      heartbeat_ms=heartbeat_ms))


class GuestProcess:
    """A VMM process running (or about to run) one guest, killed on close()."""

    def __init__(self, vm_dir: Path, config: pb.VmConfig) -> None:
        self.dir = vm_dir
        self.config = config
        self.proc, self.client = spawn_vmm(vm_dir, config)

    def console(self) -> bytes:
        return b"".join(self.client.console_read())

    def report(self) -> report.Report:
        return report.parse_bytes(self.console())

    def wait_heartbeats(self, count: int, timeout: float = 20.0,
                        after: int = 0) -> report.Report:
        """Wait until every vCPU has printed `count` heartbeats past n=`after`."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.report()
            cpus = range(self.config.vcpu_count)
            if all((hb := r.last(c)) is not None and hb.n >= after + count for c in cpus):
                return r
            if r.problems:
                raise AssertionError(f"guest reported: {r.problems[:3]}")
            if time.monotonic() > deadline:
                st = self.client.status()
                raise AssertionError(
                    f"no {count} heartbeats after n={after} within {timeout}s "
                    f"(state {st.state}, {st.detail!r}); console tail: {self.console()[-400:]!r}")
            time.sleep(0.05)

    def close(self) -> None:
        self.client.shutdown()
        self.client.close()
        try:
            self.proc.wait(5)
        except Exception:
            kill_vmm(self.proc.pid)
            self.proc.wait(5)


def copy_memory(src: VmmClient, dst: VmmClient) -> None:
    """Copy all guest memory from one VMM to another (both paused or not
    running; the destination fresh). Only what the source ever wrote is
    copied: the rest is a hole in both memfds, zero either way."""
    a = MappedMemory(src.memory())
    b = MappedMemory(dst.memory(), writable=True)
    try:
        for off, length in data_ranges(a.fd, a.size):
            b.map[off:off + length] = a.map[off:off + length]
    finally:
        a.close()
        b.close()
