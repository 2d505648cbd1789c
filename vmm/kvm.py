"""The /dev/kvm API from Python: ioctl numbers, structs and thin wrappers.

Nothing here knows about guests or devices; it only speaks the kernel's ABI
(include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h). The size of a
struct is part of an ioctl's request code, so the codes are computed from the
ctypes structures below rather than written as magic numbers.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterable

# ---------------------------------------------------------------- ioctl codes

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: type | int) -> int:
    return _ioc(_IOC_READ, nr, struct if isinstance(struct, int) else ctypes.sizeof(struct))


def _iow(nr: int, struct: type | int) -> int:
    return _ioc(_IOC_WRITE, nr, struct if isinstance(struct, int) else ctypes.sizeof(struct))


def _iowr(nr: int, struct: type | int) -> int:
    size = struct if isinstance(struct, int) else ctypes.sizeof(struct)
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


u8, u16, u32, u64, s64 = (ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32,
                          ctypes.c_uint64, ctypes.c_int64)


class Struct(ctypes.Structure):
    """A ctypes structure with byte conversion helpers."""

    def to_bytes(self) -> bytes:
        return bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> Struct:
        if len(data) != ctypes.sizeof(cls):
            raise ValueError(f"{cls.__name__}: expected {ctypes.sizeof(cls)} bytes, "
                             f"got {len(data)}")
        return cls.from_buffer_copy(data)


# ---------------------------------------------------------------- structures


class UserspaceMemoryRegion(Struct):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class Regs(Struct):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class Segment(Struct):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class Dtable(Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class Sregs(Struct):
    _fields_ = [*[(n, Segment) for n in SEGMENT_NAMES],
                ("gdt", Dtable), ("idt", Dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64), ("interrupt_bitmap", u64 * 4)]


class Fpu(Struct):
    _fields_ = [("fpr", u8 * 128), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
                ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", u8 * 256), ("mxcsr", u32), ("pad2", u32)]


class LapicState(Struct):
    _fields_ = [("regs", u8 * 1024)]


class ExceptionEvent(Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class InterruptEvent(Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class NmiEvent(Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class SmiEvent(Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class VcpuEvents(Struct):
    _fields_ = [("exception", ExceptionEvent), ("interrupt", InterruptEvent),
                ("nmi", NmiEvent), ("sipi_vector", u32), ("flags", u32), ("smi", SmiEvent),
                ("triple_fault_pending", u8), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


# kvm_vcpu_events.flags
VCPUEVENT_VALID_NMI_PENDING = 0x1
VCPUEVENT_VALID_SIPI_VECTOR = 0x2
VCPUEVENT_VALID_SHADOW = 0x4
VCPUEVENT_VALID_SMM = 0x8
VCPUEVENT_VALID_PAYLOAD = 0x10
VCPUEVENT_VALID_TRIPLE_FAULT = 0x20


class MpState(Struct):
    _fields_ = [("mp_state", u32)]


MP_STATE_RUNNABLE = 0
MP_STATE_UNINITIALIZED = 1
MP_STATE_INIT_RECEIVED = 2
MP_STATE_HALTED = 3


class Debugregs(Struct):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64),
                ("reserved", u64 * 9)]


class Xcr(Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


MAX_XCRS = 16


class Xcrs(Struct):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", Xcr * MAX_XCRS),
                ("padding", u64 * 16)]


class MsrEntry(Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class MsrsHeader(Struct):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class MsrListHeader(Struct):
    _fields_ = [("nmsrs", u32)]


class CpuidEntry2(Struct):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


CPUID_FLAG_SIGNIFICANT_INDEX = 1


class Cpuid2Header(Struct):
    _fields_ = [("nent", u32), ("padding", u32)]


class PicState(Struct):
    _fields_ = [(n, u8) for n in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
        "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
        "special_fully_nested_mode", "init4", "elcr", "elcr_mask")]


IOAPIC_NUM_PINS = 24


class IoapicState(Struct):
    _fields_ = [("base_address", u64), ("ioregsel", u32), ("id", u32), ("irr", u32),
                ("pad", u32), ("redirtbl", u64 * IOAPIC_NUM_PINS)]


class Irqchip(Struct):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * 512)]


IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IRQCHIP_IOAPIC = 0, 1, 2


class PitChannelState(Struct):
    _fields_ = [("count", u32), ("latched_count", u16), ("count_latched", u8),
                ("status_latched", u8), ("status", u8), ("read_state", u8),
                ("write_state", u8), ("write_latch", u8), ("rw_mode", u8), ("mode", u8),
                ("bcd", u8), ("gate", u8), ("count_load_time", s64)]


class PitState2(Struct):
    _fields_ = [("channels", PitChannelState * 3), ("flags", u32), ("reserved", u32 * 9)]


class PitConfig(Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


PIT_SPEAKER_DUMMY = 1


class ClockData(Struct):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


CLOCK_TSC_STABLE = 2
CLOCK_REALTIME = 1 << 2
CLOCK_HOST_TSC = 1 << 3


class IrqLevel(Struct):
    _fields_ = [("irq", u32), ("level", u32)]


class DirtyLog(Struct):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class ClearDirtyLog(Struct):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class EnableCap(Struct):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


XSAVE_LEGACY_SIZE = 4096

# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, MsrListHeader)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, Cpuid2Header)
KVM_GET_MSR_FEATURE_INDEX_LIST = _iowr(0x0A, MsrListHeader)
# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, DirtyLog)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, UserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, IrqLevel)
KVM_GET_IRQCHIP = _iowr(0x62, Irqchip)
KVM_SET_IRQCHIP = _ior(0x63, Irqchip)
KVM_CREATE_PIT2 = _iow(0x77, PitConfig)
KVM_SET_CLOCK = _iow(0x7B, ClockData)
KVM_GET_CLOCK = _ior(0x7C, ClockData)
KVM_GET_PIT2 = _ior(0x9F, PitState2)
KVM_SET_PIT2 = _iow(0xA0, PitState2)
KVM_ENABLE_CAP = _iow(0xA3, EnableCap)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, ClearDirtyLog)
# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, Regs)
KVM_SET_REGS = _iow(0x82, Regs)
KVM_GET_SREGS = _ior(0x83, Sregs)
KVM_SET_SREGS = _iow(0x84, Sregs)
KVM_GET_MSRS = _iowr(0x88, MsrsHeader)
KVM_SET_MSRS = _iow(0x89, MsrsHeader)
KVM_GET_FPU = _ior(0x8C, Fpu)
KVM_SET_FPU = _iow(0x8D, Fpu)
KVM_GET_LAPIC = _ior(0x8E, LapicState)
KVM_SET_LAPIC = _iow(0x8F, LapicState)
KVM_SET_CPUID2 = _iow(0x90, Cpuid2Header)
KVM_GET_CPUID2 = _iowr(0x91, Cpuid2Header)
KVM_GET_MP_STATE = _ior(0x98, MpState)
KVM_SET_MP_STATE = _iow(0x99, MpState)
KVM_GET_VCPU_EVENTS = _ior(0x9F, VcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, VcpuEvents)
KVM_GET_DEBUGREGS = _ior(0xA1, Debugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, Debugregs)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, XSAVE_LEGACY_SIZE)
KVM_SET_XSAVE = _iow(0xA5, XSAVE_LEGACY_SIZE)
KVM_GET_XCRS = _ior(0xA6, Xcrs)
KVM_SET_XCRS = _iow(0xA7, Xcrs)
KVM_KVMCLOCK_CTRL = _io(0xAD)
KVM_GET_XSAVE2 = _ior(0xCF, XSAVE_LEGACY_SIZE)

# capabilities
CAP_IRQCHIP = 0
CAP_USER_MEMORY = 3
CAP_SET_TSS_ADDR = 4
CAP_EXT_CPUID = 7
CAP_NR_VCPUS = 9
CAP_NR_MEMSLOTS = 10
CAP_MP_STATE = 14
CAP_IRQ_INJECT_STATUS = 26
CAP_PIT2 = 33
CAP_PIT_STATE2 = 35
CAP_SET_IDENTITY_MAP_ADDR = 37
CAP_ADJUST_CLOCK = 39
CAP_VCPU_EVENTS = 41
CAP_DEBUGREGS = 50
CAP_XSAVE = 55
CAP_XCRS = 56
CAP_TSC_CONTROL = 60
CAP_GET_TSC_KHZ = 61
CAP_MAX_VCPUS = 66
CAP_TSC_DEADLINE_TIMER = 72
CAP_KVMCLOCK_CTRL = 76
CAP_IMMEDIATE_EXIT = 136
CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
CAP_XSAVE2 = 208

# The capabilities without which the VMM cannot save and restore a guest.
REQUIRED_CAPS = {
    CAP_IRQCHIP: "in-kernel irqchip",
    CAP_USER_MEMORY: "user memory slots",
    CAP_SET_TSS_ADDR: "SET_TSS_ADDR",
    CAP_EXT_CPUID: "CPUID2",
    CAP_MP_STATE: "MP state",
    CAP_PIT2: "in-kernel PIT",
    CAP_PIT_STATE2: "PIT state save/restore",
    CAP_ADJUST_CLOCK: "kvmclock save/restore",
    CAP_VCPU_EVENTS: "vCPU event save/restore",
    CAP_DEBUGREGS: "debug register save/restore",
    CAP_XSAVE: "XSAVE state save/restore",
    CAP_XCRS: "XCR save/restore",
    CAP_IMMEDIATE_EXIT: "immediate exit (clean vCPU pause)",
}

MEM_LOG_DIRTY_PAGES = 1

# exit reasons
EXIT_UNKNOWN = 0
EXIT_EXCEPTION = 1
EXIT_IO = 2
EXIT_HYPERCALL = 3
EXIT_DEBUG = 4
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_IRQ_WINDOW_OPEN = 7
EXIT_SHUTDOWN = 8
EXIT_FAIL_ENTRY = 9
EXIT_INTR = 10
EXIT_INTERNAL_ERROR = 17
EXIT_SYSTEM_EVENT = 24

EXIT_NAMES = {
    EXIT_UNKNOWN: "UNKNOWN", EXIT_EXCEPTION: "EXCEPTION", EXIT_IO: "IO",
    EXIT_HYPERCALL: "HYPERCALL", EXIT_DEBUG: "DEBUG", EXIT_HLT: "HLT", EXIT_MMIO: "MMIO",
    EXIT_IRQ_WINDOW_OPEN: "IRQ_WINDOW_OPEN", EXIT_SHUTDOWN: "SHUTDOWN",
    EXIT_FAIL_ENTRY: "FAIL_ENTRY", EXIT_INTR: "INTR", EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
    EXIT_SYSTEM_EVENT: "SYSTEM_EVENT",
}

INTERNAL_ERROR_NAMES = {1: "emulation failure", 2: "simultaneous exceptions",
                        3: "unexpected exit during event delivery"}


class KvmRunHeader(Struct):
    """The fixed head of the shared kvm_run page (the union starts at 32)."""

    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64)]


class IoExit(Struct):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class MmioExit(Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class InternalExit(Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class SystemEventExit(Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


EXIT_UNION_OFFSET = 32
IO_IN, IO_OUT = 0, 1


# ---------------------------------------------------------------- errors


class KvmError(Exception):
    """A KVM operation failed; the message is one line a user can act on."""


class KvmUnavailable(KvmError):
    """/dev/kvm is missing, not accessible, or lacks a capability we need."""


# ---------------------------------------------------------------- ioctl calls

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int


def ioctl_int(fd: int, request: int, arg: int = 0) -> int:
    """ioctl with an integer argument passed as unsigned long.

    fcntl.ioctl would parse the integer as a C int, which breaks arguments such
    as a TSS address above 2 GiB.
    """
    ret = _libc.ioctl(fd, request, ctypes.c_ulong(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def ioctl_buf(fd: int, request: int, buf: ctypes.Array | ctypes.Structure) -> int:
    """ioctl with a pointer to a (mutable) ctypes object."""
    ret = _libc.ioctl(fd, request, ctypes.c_ulong(ctypes.addressof(buf)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def get_struct(fd: int, request: int, cls: type[Struct]) -> Struct:
    obj = cls()
    ioctl_buf(fd, request, obj)
    return obj


def set_struct(fd: int, request: int, obj: Struct) -> None:
    ioctl_buf(fd, request, obj)


# ---------------------------------------------------------------- system


class Kvm:
    """The /dev/kvm system file descriptor."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd, "
                "or enable nested virtualization)") from None
        except PermissionError:
            raise KvmUnavailable(
                f"no permission to open {path}: run as root or join the 'kvm' group") from None
        try:
            version = ioctl_int(self.fd, KVM_GET_API_VERSION)
        except OSError:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} is not a KVM device") from None
        if version != 12:
            raise KvmUnavailable(f"{path} speaks KVM API version {version}, expected 12")
        self.vcpu_mmap_size = ioctl_int(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        return ioctl_int(self.fd, KVM_CHECK_EXTENSION, cap)

    def require_capabilities(self) -> None:
        missing = [name for cap, name in REQUIRED_CAPS.items() if not self.check_extension(cap)]
        if missing:
            raise KvmUnavailable("KVM on this host lacks required capabilities: " +
                                 ", ".join(missing))

    def msr_index_list(self) -> list[int]:
        return _msr_list(self.fd, KVM_GET_MSR_INDEX_LIST)

    def supported_cpuid(self) -> list[CpuidEntry2]:
        return _cpuid_call(self.fd, KVM_GET_SUPPORTED_CPUID, None)

    def max_vcpus(self) -> int:
        return self.check_extension(CAP_MAX_VCPUS) or self.check_extension(CAP_NR_VCPUS) or 1

    def close(self) -> None:
        os.close(self.fd)


def _msr_list(fd: int, request: int) -> list[int]:
    n = 512
    while True:
        buf = (u32 * (1 + n))()
        buf[0] = n
        try:
            ioctl_buf(fd, request, buf)
        except OSError as e:
            if e.errno == errno.E2BIG:
                n = buf[0] if buf[0] > n else n * 2
                continue
            raise
        return [buf[1 + i] for i in range(buf[0])]


def _cpuid_call(fd: int, request: int, entries: Iterable[CpuidEntry2] | None) -> list[CpuidEntry2]:
    if entries is None:
        n = 256
        while True:
            arr_t = CpuidEntry2 * n

            class Buf(ctypes.Structure):
                _fields_ = [("hdr", Cpuid2Header), ("entries", arr_t)]

            buf = Buf()
            buf.hdr.nent = n
            try:
                ioctl_buf(fd, request, buf)
            except OSError as e:
                if e.errno == errno.E2BIG:
                    n *= 2
                    continue
                raise
            return [CpuidEntry2.from_buffer_copy(bytes(buf.entries[i]))
                    for i in range(buf.hdr.nent)]
    items = list(entries)
    arr_t = CpuidEntry2 * len(items)

    class SetBuf(ctypes.Structure):
        _fields_ = [("hdr", Cpuid2Header), ("entries", arr_t)]

    buf = SetBuf()
    buf.hdr.nent = len(items)
    for i, e in enumerate(items):
        buf.entries[i] = e
    ioctl_buf(fd, request, buf)
    return items


def set_cpuid2(vcpu_fd: int, entries: Iterable[CpuidEntry2]) -> None:
    _cpuid_call(vcpu_fd, KVM_SET_CPUID2, entries)


def get_msrs(vcpu_fd: int, indices: list[int]) -> list[tuple[int, int]]:
    """Read MSRs; KVM stops at the first it cannot read, so we read the rest
    one past it and report which were skipped by leaving them out."""
    out: list[tuple[int, int]] = []
    pending = list(indices)
    while pending:
        n = len(pending)

        class Buf(ctypes.Structure):
            _fields_ = [("hdr", MsrsHeader), ("entries", MsrEntry * n)]

        buf = Buf()
        buf.hdr.nmsrs = n
        for i, idx in enumerate(pending):
            buf.entries[i].index = idx
        got = ioctl_buf(vcpu_fd, KVM_GET_MSRS, buf)
        out.extend((buf.entries[i].index, buf.entries[i].data) for i in range(got))
        pending = pending[got + 1:]  # skip the one that failed
    return out


def set_msrs(vcpu_fd: int, entries: list[tuple[int, int]]) -> None:
    n = len(entries)
    if n == 0:
        return

    class Buf(ctypes.Structure):
        _fields_ = [("hdr", MsrsHeader), ("entries", MsrEntry * n)]

    buf = Buf()
    buf.hdr.nmsrs = n
    for i, (idx, val) in enumerate(entries):
        buf.entries[i].index = idx
        buf.entries[i].data = val
    got = ioctl_buf(vcpu_fd, KVM_SET_MSRS, buf)
    if got != n:
        bad = entries[got][0]
        raise KvmError(f"KVM refused to set MSR {bad:#x} ({got} of {n} MSRs set)")


def enable_cap(fd: int, cap: int, *args: int) -> None:
    ec = EnableCap()
    ec.cap = cap
    for i, a in enumerate(args):
        ec.args[i] = a
    ioctl_buf(fd, KVM_ENABLE_CAP, ec)


def map_kvm_run(vcpu_fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(vcpu_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
