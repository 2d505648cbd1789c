"""One virtual CPU: its KVM file descriptor, its run loop and its state.

The run loop lives in a thread of its own. KVM_RUN releases the GIL, so the
vCPUs run in parallel; only exits to the VMM (port I/O to an emulated device)
take the GIL. Pausing uses the kvm_run `immediate_exit` flag plus a signal, so
a vCPU can be stopped whether it is inside KVM_RUN or about to enter it, and
any half-done port I/O is completed before its state is read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm import convert, kvm

if TYPE_CHECKING:
    from vmigrate.vmm.iobus import IoBus

MSR_MTRRCAP = 0xFE
MSR_TSC_DEADLINE = 0x6E0
MTRR_MSRS = [*range(0x200, 0x210), 0x250, 0x258, 0x259, *range(0x268, 0x270), 0x2FF]
# Read-only or restored separately (after the LAPIC, which resets the timer).
_MSRS_NOT_SET_IN_BULK = {MSR_MTRRCAP, MSR_TSC_DEADLINE}


class GuestStopped(Exception):
    """Raised inside the run loop when the guest can no longer run."""

    def __init__(self, detail: str, crashed: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.crashed = crashed


class Vcpu:
    def __init__(self, vm_fd: int, index: int, system: kvm.Kvm, msr_indices: list[int],
                 xsave_size: int) -> None:
        self.index = index
        self.fd = kvm.ioctl_int(vm_fd, kvm.KVM_CREATE_VCPU, index)
        self._run_map = kvm.map_kvm_run(self.fd, system.vcpu_mmap_size)
        self.run = kvm.KvmRunHeader.from_buffer(self._run_map)
        self._io = kvm.IoExit.from_buffer(self._run_map, kvm.EXIT_UNION_OFFSET)
        self._mmio = kvm.MmioExit.from_buffer(self._run_map, kvm.EXIT_UNION_OFFSET)
        self._internal = kvm.InternalExit.from_buffer(self._run_map, kvm.EXIT_UNION_OFFSET)
        self._run_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._run_map))
        self.xsave_size = xsave_size
        self.exits = 0
        self.thread: threading.Thread | None = None
        # Only MSRs this vCPU can actually read are saved.
        self.msr_indices = [i for i, _ in kvm.get_msrs(self.fd, msr_indices)]

    # ---------------------------------------------------------------- state
    def set_cpuid(self, entries: list[kvm.CpuidEntry2]) -> None:
        kvm.set_cpuid2(self.fd, entries)
        self.cpuid = entries

    def save(self) -> pb.VcpuState:
        """Read every piece of vCPU state; the vCPU must be paused."""
        fd = self.fd
        s = pb.VcpuState(id=self.index)
        s.regs.CopyFrom(convert.regs_to_msg(kvm.get_struct(fd, kvm.KVM_GET_REGS, kvm.Regs)))
        s.sregs.CopyFrom(convert.sregs_to_msg(kvm.get_struct(fd, kvm.KVM_GET_SREGS, kvm.Sregs)))
        xsave = (ctypes.c_uint8 * self.xsave_size)()
        large = self.xsave_size > kvm.XSAVE_LEGACY_SIZE
        request = kvm.KVM_GET_XSAVE2 if large else kvm.KVM_GET_XSAVE
        kvm.ioctl_buf(fd, request, xsave)
        s.xsave = bytes(xsave)
        s.xcrs.extend(convert.xcrs_to_msg(kvm.get_struct(fd, kvm.KVM_GET_XCRS, kvm.Xcrs)))
        s.msrs.extend(pb.Msr(index=i, value=v) for i, v in kvm.get_msrs(fd, self.msr_indices))
        s.lapic = bytes(kvm.get_struct(fd, kvm.KVM_GET_LAPIC, kvm.LapicState))
        s.events.CopyFrom(convert.events_to_msg(
            kvm.get_struct(fd, kvm.KVM_GET_VCPU_EVENTS, kvm.VcpuEvents)))
        s.mp_state = kvm.get_struct(fd, kvm.KVM_GET_MP_STATE, kvm.MpState).mp_state
        s.debugregs.CopyFrom(convert.debugregs_to_msg(
            kvm.get_struct(fd, kvm.KVM_GET_DEBUGREGS, kvm.Debugregs)))
        s.cpuid.extend(convert.cpuid_to_msg(self.cpuid))
        try:
            s.tsc_khz = kvm.ioctl_int(fd, kvm.KVM_GET_TSC_KHZ)
        except OSError:
            s.tsc_khz = 0
        return s

    def restore(self, s: pb.VcpuState) -> None:
        """Load state in the order KVM needs (docs/vmm.md, "Restore order")."""
        fd = self.fd
        if s.cpuid:
            self.set_cpuid(convert.cpuid_from_msg(list(s.cpuid)))
        kvm.set_struct(fd, kvm.KVM_SET_REGS, convert.regs_from_msg(s.regs))
        if s.xsave:
            buf = (ctypes.c_uint8 * max(len(s.xsave), kvm.XSAVE_LEGACY_SIZE))()
            ctypes.memmove(buf, s.xsave, len(s.xsave))
            kvm.ioctl_buf(fd, kvm.KVM_SET_XSAVE, buf)
        elif s.fpu:
            kvm.set_struct(fd, kvm.KVM_SET_FPU, kvm.Fpu.from_bytes(s.fpu))
        if s.xcrs:
            kvm.set_struct(fd, kvm.KVM_SET_XCRS, convert.xcrs_from_msg(list(s.xcrs)))
        kvm.set_struct(fd, kvm.KVM_SET_SREGS, convert.sregs_from_msg(s.sregs))
        kvm.set_msrs(fd, [(m.index, m.value) for m in s.msrs
                          if m.index not in _MSRS_NOT_SET_IN_BULK])
        mp = kvm.MpState()
        mp.mp_state = s.mp_state
        kvm.set_struct(fd, kvm.KVM_SET_MP_STATE, mp)
        if s.lapic:
            kvm.set_struct(fd, kvm.KVM_SET_LAPIC, kvm.LapicState.from_bytes(s.lapic))
        kvm.set_msrs(fd, [(m.index, m.value) for m in s.msrs if m.index == MSR_TSC_DEADLINE])
        kvm.set_struct(fd, kvm.KVM_SET_VCPU_EVENTS, convert.events_from_msg(s.events))
        kvm.set_struct(fd, kvm.KVM_SET_DEBUGREGS, convert.debugregs_from_msg(s.debugregs))

    def set_initial(self, regs: kvm.Regs, sregs: kvm.Sregs) -> None:
        """Start this vCPU at `regs`/`sregs`. APs are made runnable directly: the
        VMM plays firmware, so no INIT/SIPI dance in (slow, emulated) real mode."""
        kvm.set_struct(self.fd, kvm.KVM_SET_SREGS, sregs)
        kvm.set_struct(self.fd, kvm.KVM_SET_REGS, regs)
        mp = kvm.MpState()
        mp.mp_state = kvm.MP_STATE_RUNNABLE
        kvm.set_struct(self.fd, kvm.KVM_SET_MP_STATE, mp)

    def get_sregs(self) -> kvm.Sregs:
        return kvm.get_struct(self.fd, kvm.KVM_GET_SREGS, kvm.Sregs)

    # ---------------------------------------------------------------- running
    def run_once(self) -> bool:
        """Enter the guest until the next exit; False if interrupted by a signal."""
        try:
            kvm.ioctl_int(self.fd, kvm.KVM_RUN)
        except OSError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN):
                return False
            raise GuestStopped(f"KVM_RUN failed on vCPU {self.index}: {e.strerror}", True) from None
        self.exits += 1
        return True

    def handle_exit(self, bus: IoBus) -> None:
        reason = self.run.exit_reason
        if reason == kvm.EXIT_IO:
            self._handle_io(bus)
        elif reason == kvm.EXIT_MMIO:
            m = self._mmio
            if not m.is_write:
                ctypes.memset(ctypes.addressof(m.data), 0xFF, 8)
            bus.note_unhandled_mmio(m.phys_addr, bool(m.is_write))
        elif reason in (kvm.EXIT_INTR, kvm.EXIT_IRQ_WINDOW_OPEN, kvm.EXIT_HLT):
            return
        elif reason == kvm.EXIT_SHUTDOWN:
            raise GuestStopped(f"vCPU {self.index}: triple fault (guest shut down)", True)
        elif reason == kvm.EXIT_SYSTEM_EVENT:
            raise GuestStopped(f"vCPU {self.index}: guest requested shutdown/reset", False)
        elif reason == kvm.EXIT_INTERNAL_ERROR:
            i = self._internal
            what = kvm.INTERNAL_ERROR_NAMES.get(i.suberror, f"suberror {i.suberror}")
            data = " ".join(f"{i.data[k]:#x}" for k in range(min(i.ndata, 16)))
            rip = self._rip()
            raise GuestStopped(
                f"vCPU {self.index}: KVM internal error ({what}) at rip {rip:#x}"
                + (f": {data}" if data else "") + self._instruction_hint(rip), True)
        elif reason == kvm.EXIT_FAIL_ENTRY:
            raise GuestStopped(f"vCPU {self.index}: KVM could not enter the guest", True)
        else:
            name = kvm.EXIT_NAMES.get(reason, str(reason))
            raise GuestStopped(f"vCPU {self.index}: unexpected exit {name}", True)

    def _handle_io(self, bus: IoBus) -> None:
        io = self._io
        size, port, count = io.size, io.port, io.count
        addr = self._run_addr + io.data_offset
        if io.direction == kvm.IO_OUT:
            data = ctypes.string_at(addr, size * count)
            for k in range(count):
                bus.write(port, size, int.from_bytes(data[k * size:(k + 1) * size], "little"))
        else:
            out = b"".join(bus.read(port, size).to_bytes(size, "little") for _ in range(count))
            ctypes.memmove(addr, out, len(out))

    def _rip(self) -> int:
        try:
            return kvm.get_struct(self.fd, kvm.KVM_GET_REGS, kvm.Regs).rip
        except OSError:
            return 0

    def _instruction_hint(self, rip: int) -> str:
        hint = getattr(self, "instruction_reader", None)
        if hint is None:
            return ""
        code = hint(rip)
        return f" (instruction bytes {code.hex(' ')})" if code else ""

    def close(self) -> None:
        for view in ("run", "_io", "_mmio", "_internal"):
            setattr(self, view, None)
        try:
            self._run_map.close()
        except BufferError:
            pass
        os.close(self.fd)


class VcpuThread(threading.Thread):
    """Runs one vCPU until the machine stops it; parks it while paused."""

    def __init__(self, vcpu: Vcpu, machine_ctl: RunControl, bus: IoBus,
                 on_stop: Callable[[GuestStopped], None]) -> None:
        super().__init__(name=f"vcpu{vcpu.index}", daemon=True)
        self.vcpu = vcpu
        self.ctl = machine_ctl
        self.bus = bus
        self.on_stop = on_stop

    def run(self) -> None:
        v, ctl = self.vcpu, self.ctl
        try:
            while not ctl.stopping:
                if ctl.pause_requested:
                    v.run_once()            # immediate_exit=1: completes pending I/O, returns
                    ctl.park()
                    continue
                if ctl.throttle_sleep_s:
                    ctl.throttle_nap()
                if v.run_once():
                    v.handle_exit(self.bus)
        except GuestStopped as e:
            self.on_stop(e)
        except Exception as e:  # a bug in a device must not leave the VM half-running
            self.on_stop(GuestStopped(f"vCPU {v.index}: VMM error: {e!r}", True))
        finally:
            ctl.thread_exited()


class RunControl:
    """Shared run/pause/throttle state of all vCPU threads of one machine."""

    def __init__(self, vcpus: list[Vcpu]) -> None:
        self.vcpus = vcpus
        self.cond = threading.Condition()
        self.pause_requested = False
        self.stopping = False
        self.parked = 0
        self.alive = 0
        self.throttle_sleep_s = 0.0
        self._throttle_due = [False] * len(vcpus)

    def park(self) -> None:
        with self.cond:
            self.parked += 1
            self.cond.notify_all()
            while self.pause_requested and not self.stopping:
                self.cond.wait()
            self.parked -= 1

    def thread_exited(self) -> None:
        with self.cond:
            self.alive -= 1
            self.cond.notify_all()

    def request_pause(self) -> None:
        with self.cond:
            self.pause_requested = True
            for v in self.vcpus:
                v.run.immediate_exit = 1
            self.cond.notify_all()          # wakes throttled vCPUs from their nap

    def wait_parked(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.parked < self.alive:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def release(self) -> None:
        with self.cond:
            for v in self.vcpus:
                v.run.immediate_exit = 0
            self.pause_requested = False
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            for v in self.vcpus:
                if v.run is not None:
                    v.run.immediate_exit = 1
            self.cond.notify_all()

    def throttle_nap(self) -> None:
        """Sleep a throttled vCPU's share of the slice; a pause or stop request
        cuts the nap short (it must not add to a migration's downtime)."""
        idx = threading.current_thread().name
        i = int(idx[4:]) if idx.startswith("vcpu") else 0
        if i < len(self._throttle_due) and self._throttle_due[i]:
            self._throttle_due[i] = False
            deadline = time.monotonic() + self.throttle_sleep_s
            with self.cond:
                while not (self.pause_requested or self.stopping):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)

    def mark_throttle_due(self) -> None:
        self._throttle_due = [True] * len(self.vcpus)
