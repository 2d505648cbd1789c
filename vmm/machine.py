"""A virtual machine: KVM VM, memory, vCPUs and devices, with one state tree.

`Machine.save()` and `Machine.restore()` are the only way state leaves or
enters a VM; each component contributes its own message (see docs/vmm.md for
the order, which matters).
"""

from __future__ import annotations

import ctypes
import enum
import functools
import signal
import threading
import time
from collections.abc import Callable

from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm import convert, cpu_model, kvm
from vmigrate.vmm.console import Console
from vmigrate.vmm.devices.i8042 import I8042
from vmigrate.vmm.devices.rtc import Rtc
from vmigrate.vmm.devices.uart import COM1_BASE, COM1_IRQ, Uart
from vmigrate.vmm.iobus import IoBus
from vmigrate.vmm.memory import PAGE, GuestMemory, Region, host_available_memory
from vmigrate.vmm.vcpu import MTRR_MSRS, GuestStopped, RunControl, Vcpu, VcpuThread

TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
PANIC_PORT = 0x501
POST_PORT = 0x80
RESET_CONTROL_PORT = 0xCF9
KICK_SIGNAL = signal.SIGUSR1
PAUSE_TIMEOUT_S = 5.0
THROTTLE_SLICE_S = 0.010


class MachineState(enum.Enum):
    CREATED = 1
    RUNNING = 2
    PAUSED = 3
    STOPPED = 4
    CRASHED = 5


class MachineError(Exception):
    """An operation on the machine failed; one line for the user."""


def install_kick_handler() -> None:
    """A no-op handler so the kick signal interrupts KVM_RUN instead of killing us.

    Must run in the main thread before any vCPU starts.
    """
    signal.signal(KICK_SIGNAL, lambda _sig, _frame: None)


class Machine:
    def __init__(self, config: pb.VmConfig, console: Console | None = None,
                 memory_fd: int | None = None, regions: list[Region] | None = None) -> None:
        self.config = config
        self.console = console or Console()
        self.state = MachineState.CREATED
        self.detail = ""
        self._lock = threading.RLock()
        self._on_state_change: list[Callable[[MachineState], None]] = []

        self.kvm = kvm.Kvm()
        self.kvm.require_capabilities()
        if config.vcpu_count < 1 or config.vcpu_count > self.kvm.max_vcpus():
            raise MachineError(f"this host supports 1 to {self.kvm.max_vcpus()} vCPUs per guest, "
                               f"not {config.vcpu_count}")
        if config.memory_bytes <= 0 or config.memory_bytes % PAGE:
            raise MachineError("memory size must be a positive multiple of 4 KiB")
        if memory_fd is None:
            available = host_available_memory()
            if config.memory_bytes > available:
                raise MachineError(
                    f"guest memory {config.memory_bytes >> 20} MiB is more than this host can "
                    f"give ({available >> 20} MiB available)")

        self.vm_fd = kvm.ioctl_int(self.kvm.fd, kvm.KVM_CREATE_VM, 0)
        kvm.ioctl_int(self.vm_fd, kvm.KVM_SET_TSS_ADDR, TSS_ADDR)
        kvm.ioctl_buf(self.vm_fd, kvm.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(IDENTITY_MAP_ADDR))
        kvm.ioctl_int(self.vm_fd, kvm.KVM_CREATE_IRQCHIP)
        pit = kvm.PitConfig()
        pit.flags = kvm.PIT_SPEAKER_DUMMY
        kvm.set_struct(self.vm_fd, kvm.KVM_CREATE_PIT2, pit)

        self.memory = GuestMemory(config.memory_bytes, config.name or "guest",
                                  regions=regions, fd=memory_fd)
        self.memory.register(self.vm_fd)

        xsave_size = max(kvm.ioctl_int(self.vm_fd, kvm.KVM_CHECK_EXTENSION, kvm.CAP_XSAVE2),
                         kvm.XSAVE_LEGACY_SIZE)
        msr_indices = sorted(set(self.kvm.msr_index_list()) | set(MTRR_MSRS))
        self.vcpus = [Vcpu(self.vm_fd, i, self.kvm, msr_indices, xsave_size)
                      for i in range(config.vcpu_count)]
        template = cpu_model.template(config.cpu_template or "host")
        base_cpuid = template.apply(self.kvm.supported_cpuid())
        for v in self.vcpus:
            v.set_cpuid(cpu_model.for_vcpu(base_cpuid, v.index, config.vcpu_count))
            v.instruction_reader = functools.partial(self._instruction_bytes, vcpu=v)

        self.bus = IoBus()
        self.uart = Uart(self._set_uart_irq, self.console.write)
        self.bus.register(COM1_BASE, 8, self.uart.read, self.uart.write)
        self.i8042 = I8042(self._guest_reset)
        self.bus.register(0x60, 1, lambda _o: self.i8042.read(0x60),
                          lambda _o, v: self.i8042.write(0x60, v))
        self.bus.register(0x64, 1, lambda _o: self.i8042.read(0x64),
                          lambda _o, v: self.i8042.write(0x64, v))
        self.rtc = Rtc()
        self.bus.register(0x70, 2, self.rtc.read, self.rtc.write)
        self.bus.register(PANIC_PORT, 1, lambda _o: 0, self._guest_panic)
        self.bus.register(POST_PORT, 1, lambda _o: 0xFF, lambda _o, _v: None)
        self.bus.register(RESET_CONTROL_PORT, 1, lambda _o: 0, self._reset_control)

        self.ctl = RunControl(self.vcpus)
        self._threads: list[VcpuThread] = []
        self._run_started = 0.0
        self.run_seconds = 0.0
        self.throttle_percent = 0
        self._throttle_thread: threading.Thread | None = None

    # ---------------------------------------------------------------- devices
    def _set_uart_irq(self, level: int) -> None:
        irq = kvm.IrqLevel()
        irq.irq, irq.level = COM1_IRQ, level
        kvm.set_struct(self.vm_fd, kvm.KVM_IRQ_LINE, irq)

    def _guest_reset(self) -> None:
        self._stop_from_guest(GuestStopped("guest requested a reset (reboot): VM stopped", False))

    def _reset_control(self, _offset: int, value: int) -> None:
        if value & 0x04:
            self._guest_reset()

    def _guest_panic(self, _offset: int, value: int) -> None:
        self._stop_from_guest(GuestStopped(
            f"guest fault (exception vector {value:#x}); see the console", True))

    def _instruction_bytes(self, rip: int, vcpu: Vcpu | None = None) -> bytes:
        """Best effort: the bytes at rip, through the vCPU's page tables when rip is
        virtual (a Linux kernel), else where rip maps 1:1 (the test guest, early boot)."""
        from vmigrate.vmm import insn

        gpa = insn.translate(vcpu.fd, rip) if vcpu is not None else None
        for addr in (gpa, rip & 0xFFFFFFFFFFFF):
            if addr is None:
                continue
            try:
                # Up to 15 bytes, without crossing into an unmapped page.
                return self.memory.read(addr, min(15, PAGE - (addr % PAGE)))
            except ValueError:
                continue
        return b""

    # ---------------------------------------------------------------- lifecycle
    def on_state_change(self, fn: Callable[[MachineState], None]) -> None:
        self._on_state_change.append(fn)

    def _set_state(self, state: MachineState, detail: str = "") -> None:
        with self._lock:
            if self.state == MachineState.RUNNING and state != MachineState.RUNNING:
                self.run_seconds += time.monotonic() - self._run_started
            if state == MachineState.RUNNING:
                self._run_started = time.monotonic()
            self.state = state
            if detail:
                self.detail = detail
        for fn in self._on_state_change:
            fn(state)

    def boot_test_guest(self, params: object) -> None:
        from vmigrate.vmm.testguest import layout

        assert isinstance(params, layout.TestGuestParams)
        with self._lock:
            self._require(MachineState.CREATED, "boot")
            for gpa, data in layout.boot_image(params):
                self.memory.write(gpa, data)
            for v in self.vcpus:
                sregs = v.get_sregs()
                regs = layout.initial_registers(v.index, sregs)
                v.set_initial(regs, sregs)
            self._start_threads()

    def boot_with(self, loader: Callable[[Machine], None]) -> None:
        """Boot with a custom loader (Linux): it writes memory and vCPU registers."""
        with self._lock:
            self._require(MachineState.CREATED, "boot")
            loader(self)
            self._start_threads()

    def _start_threads(self) -> None:
        self.ctl.alive = len(self.vcpus)
        self._threads = [VcpuThread(v, self.ctl, self.bus, self._stop_from_guest)
                         for v in self.vcpus]
        self._set_state(MachineState.RUNNING)
        for t in self._threads:
            t.start()

    def _require(self, state: MachineState, what: str) -> None:
        if self.state != state:
            raise MachineError(f"cannot {what}: the VM is {self.state.name.lower()}, "
                               f"not {state.name.lower()}")

    def _kick(self) -> None:
        for t in self._threads:
            if t.is_alive() and t.ident is not None:
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    def pause(self) -> float:
        """Stop every vCPU; returns milliseconds from request to all stopped."""
        with self._lock:
            if self.state == MachineState.PAUSED:
                return 0.0
            self._require(MachineState.RUNNING, "pause")
            t0 = time.perf_counter()
            self.ctl.request_pause()
            self._kick()
            if not self.ctl.wait_parked(PAUSE_TIMEOUT_S):
                self.ctl.release()
                raise MachineError("vCPUs did not stop within "
                                   f"{PAUSE_TIMEOUT_S:.0f} s; the VM keeps running")
            ms = (time.perf_counter() - t0) * 1000
            if self.state == MachineState.RUNNING:
                self._set_state(MachineState.PAUSED)
            return ms

    def resume(self) -> None:
        with self._lock:
            if self.state == MachineState.RUNNING:
                return
            if self.state == MachineState.CREATED:
                # restored state, never run in this process: start the threads
                self._start_threads()
                return
            self._require(MachineState.PAUSED, "resume")
            self._set_state(MachineState.RUNNING)
            self.ctl.release()

    def activate_paused(self) -> None:
        """A restored VM that stays paused: start its vCPU threads parked, so
        it behaves like any paused VM (resume, save, migrate) without running."""
        with self._lock:
            if self.state == MachineState.PAUSED:
                return
            self._require(MachineState.CREATED, "activate")
            self.ctl.request_pause()
            self._start_threads()
            if not self.ctl.wait_parked(PAUSE_TIMEOUT_S):
                raise MachineError("vCPU threads did not start")
            self._set_state(MachineState.PAUSED)

    def _stop_from_guest(self, e: GuestStopped) -> None:
        if "emulation failure" in e.detail:
            from vmigrate.vmm import insn

            e = GuestStopped(insn.explain_emulation_failure(e.detail), e.crashed)
        with self._lock:
            if self.state in (MachineState.STOPPED, MachineState.CRASHED):
                return
            self.ctl.stop()
            self._set_state(MachineState.CRASHED if e.crashed else MachineState.STOPPED, e.detail)
        self._kick()

    def stop(self, reason: str = "stopped") -> None:
        with self._lock:
            if self.state not in (MachineState.STOPPED, MachineState.CRASHED):
                self._set_state(MachineState.STOPPED, reason)
            self.ctl.stop()
        self._kick()
        for t in self._threads:
            t.join(timeout=2)

    # ---------------------------------------------------------------- throttle
    def set_throttle(self, percent: int) -> None:
        """Make the vCPUs sleep `percent`% of each 10 ms slice (auto-converge)."""
        percent = max(0, min(99, int(percent)))
        self.throttle_percent = percent
        ratio = percent / (100 - percent)
        self.ctl.throttle_sleep_s = THROTTLE_SLICE_S * ratio if percent else 0.0
        if percent and self._throttle_thread is None:
            self._throttle_thread = threading.Thread(target=self._throttle_loop, daemon=True,
                                                     name="throttle")
            self._throttle_thread.start()

    def _throttle_loop(self) -> None:
        while not self.ctl.stopping:
            if self.throttle_percent and self.state == MachineState.RUNNING:
                self.ctl.mark_throttle_due()
                self._kick()
                time.sleep(THROTTLE_SLICE_S + self.ctl.throttle_sleep_s)
            else:
                time.sleep(THROTTLE_SLICE_S)

    # ---------------------------------------------------------------- state
    def save(self) -> pb.VmState:
        """The complete device and vCPU state (memory moves separately)."""
        with self._lock:
            if self.state not in (MachineState.PAUSED, MachineState.CREATED):
                raise MachineError(f"cannot save a {self.state.name.lower()} VM: pause it first")
            st = pb.VmState()
            st.config.CopyFrom(self.config)
            # The clock first: closest to the moment the vCPUs stopped.
            st.clock.CopyFrom(convert.clock_to_msg(
                kvm.get_struct(self.vm_fd, kvm.KVM_GET_CLOCK, kvm.ClockData)))
            st.irqchip.pic_master.CopyFrom(convert.pic_to_msg(self._get_irqchip(0)))
            st.irqchip.pic_slave.CopyFrom(convert.pic_to_msg(self._get_irqchip(1)))
            st.irqchip.ioapic.CopyFrom(convert.ioapic_to_msg(self._get_irqchip(2)))
            st.pit.CopyFrom(convert.pit_to_msg(
                kvm.get_struct(self.vm_fd, kvm.KVM_GET_PIT2, kvm.PitState2)))
            st.vcpus.extend(v.save() for v in self.vcpus)
            st.devices.serial0.CopyFrom(self.uart.save())
            st.devices.i8042.CopyFrom(self.i8042.save())
            st.devices.rtc.CopyFrom(self.rtc.save())
            st.memory.page_size = PAGE
            st.memory.regions.extend(
                pb.MemoryRegion(guest_phys_addr=r.guest_phys_addr, size=r.size,
                                file_offset=r.file_offset) for r in self.memory.regions)
            return st

    def restore(self, st: pb.VmState) -> None:
        """Load a saved state into a VM that has not run; it stays paused."""
        with self._lock:
            self._require(MachineState.CREATED, "restore")
            if len(st.vcpus) != len(self.vcpus):
                raise MachineError(f"state has {len(st.vcpus)} vCPUs, this VM {len(self.vcpus)}")
            layout = [(r.guest_phys_addr, r.size, r.file_offset) for r in st.memory.regions]
            ours = [(r.guest_phys_addr, r.size, r.file_offset) for r in self.memory.regions]
            if layout != ours:
                raise MachineError("state's memory layout differs from this VM's")
            host_khz = self._host_tsc_khz()
            for vs in st.vcpus:
                if vs.tsc_khz and host_khz and abs(vs.tsc_khz - host_khz) * 1000 > host_khz:
                    raise MachineError(
                        f"the guest's TSC runs at {vs.tsc_khz} kHz and this host's at "
                        f"{host_khz} kHz, and KVM here cannot scale it")
            try:
                for v, vs in zip(self.vcpus, st.vcpus, strict=True):
                    v.restore(vs)
                self._set_irqchip(0, convert.pic_from_msg(st.irqchip.pic_master))
                self._set_irqchip(1, convert.pic_from_msg(st.irqchip.pic_slave))
                self._set_irqchip(2, convert.ioapic_from_msg(st.irqchip.ioapic))
                kvm.set_struct(self.vm_fd, kvm.KVM_SET_PIT2, convert.pit_from_msg(st.pit))
                self.uart.restore(st.devices.serial0)
                self.i8042.restore(st.devices.i8042)
                if st.devices.HasField("rtc"):
                    self.rtc.restore(st.devices.rtc)
                # The clock last, so the guest sees no time pass during the restore.
                kvm.set_struct(self.vm_fd, kvm.KVM_SET_CLOCK, convert.clock_from_msg(st.clock))
            except (OSError, kvm.KvmError) as e:
                raise MachineError(f"KVM refused the saved state: {e}") from None
            self.config = st.config

    def _host_tsc_khz(self) -> int:
        try:
            return kvm.ioctl_int(self.vcpus[0].fd, kvm.KVM_GET_TSC_KHZ)
        except OSError:
            return 0

    def _get_irqchip(self, chip: int) -> bytes:
        ic = kvm.Irqchip()
        ic.chip_id = chip
        kvm.ioctl_buf(self.vm_fd, kvm.KVM_GET_IRQCHIP, ic)
        return bytes(ic.chip)

    def _set_irqchip(self, chip: int, data: bytes) -> None:
        ic = kvm.Irqchip()
        ic.chip_id = chip
        ctypes.memmove(ic.chip, data, len(data))
        kvm.ioctl_buf(self.vm_fd, kvm.KVM_SET_IRQCHIP, ic)

    # ---------------------------------------------------------------- teardown
    def features_in_use(self) -> list[str]:
        """State features the guest now depends on (see migrate/translate.py)."""
        return ["dev.rtc"] if self.rtc.used else []

    @property
    def exits(self) -> int:
        return sum(v.exits for v in self.vcpus)

    def close(self) -> None:
        self.stop("closed")
        for v in self.vcpus:
            v.close()
        self.memory.close()
        import os

        os.close(self.vm_fd)
        self.kvm.close()
