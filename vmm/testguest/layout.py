"""What the VMM writes into guest memory before the test guest's first
instruction, and the registers each vCPU starts with.

Addresses and offsets come from the `.set` lines of guest.S, so the assembly
and the VMM cannot drift apart.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from importlib import resources
from types import SimpleNamespace

from vmigrate.vmm import kvm

PAGE = 4096
GIB = 1 << 30
DEFAULT_VERIFY_CAP = 128 << 20
PIT_HZ = 1193182
LAPIC_BUS_HZ = 1_000_000_000     # KVM's APIC timer runs at 1 GHz (1 ns per tick)

_SET_LINE = re.compile(r"^\s*\.set\s+(\w+),\s*(.+?)\s*(?:/\*.*\*/)?\s*$")


def _parse_layout(source: str) -> SimpleNamespace:
    values: dict[str, int] = {}
    for line in source.splitlines():
        m = _SET_LINE.match(line)
        if m:
            values[m.group(1)] = int(m.group(2), 0)
    return SimpleNamespace(**values)


def guest_source() -> str:
    return resources.files("vmigrate.vmm.testguest").joinpath("guest.S").read_text()


def guest_binary() -> bytes:
    return resources.files("vmigrate.vmm.testguest").joinpath("guest.bin").read_bytes()


LAYOUT = _parse_layout(guest_source())
# Highest guest-physical address the test guest can use: its page tables map
# the first 4 GiB, and 3-4 GiB is the MMIO hole (LAPIC, IOAPIC).
TEST_GUEST_MAX_RAM = 3 * GIB


@dataclass(frozen=True)
class TestGuestParams:
    """The knobs of the test guest, as the user gives them."""

    memory_bytes: int
    vcpus: int
    working_set_bytes: int
    dirty_rate_bytes_per_s: int
    timer_hz: int = 250
    heartbeat_ms: int = 1000
    verify_bytes_per_s: int = 0      # 0: verify the whole working set every second
    kvmclock: bool = True
    probe_syscall: bool = False      # run the user-space probe instead of the workload
    use_rtc: bool = False            # read the CMOS RTC in every heartbeat
    fill_once: bool = False          # write the working set once, then only verify it

    def validate(self) -> None:
        if self.vcpus < 1 or self.vcpus > LAYOUT.MAX_CPUS:
            raise ValueError(f"the test guest supports 1 to {LAYOUT.MAX_CPUS} vCPUs")
        # Memory above 3 GiB is allowed (it lies above the MMIO hole) but the
        # guest only maps, and so only exercises, the first 3 GiB.
        room = min(self.memory_bytes, TEST_GUEST_MAX_RAM) - LAYOUT.WS_BASE
        if room < 0:
            raise ValueError(f"the test guest needs at least {LAYOUT.WS_BASE >> 20} MiB of memory")
        if self.working_set_bytes > room:
            raise ValueError(
                f"working set {self.working_set_bytes >> 20} MiB does not fit: the test guest "
                f"has {room >> 20} MiB for it (memory {self.memory_bytes >> 20} MiB; the "
                "working set must lie below 3 GiB)")
        if not 10 <= self.timer_hz <= 1000:
            raise ValueError("timer frequency must be 10-1000 Hz")

    @property
    def pages_per_cpu(self) -> int:
        return self.working_set_bytes // PAGE // self.vcpus


def params_block(p: TestGuestParams) -> bytes:
    """The parameter page the guest reads at PARAMS."""
    pages_per_cpu = p.pages_per_cpu
    rate_per_cpu = p.dirty_rate_bytes_per_s / p.vcpus
    write_fp = int(rate_per_cpu / PAGE / p.timer_hz * 65536)
    # By default each vCPU re-checks its whole slice every second, up to
    # 128 MiB/s (a check costs about a microsecond per page of guest CPU).
    verify_rate = (p.verify_bytes_per_s / p.vcpus if p.verify_bytes_per_s
                   else min(pages_per_cpu * PAGE, DEFAULT_VERIFY_CAP))
    verify_per_tick = math.ceil(verify_rate / PAGE / p.timer_hz) if pages_per_cpu else 0
    hb_ticks = max(1, round(p.heartbeat_ms * p.timer_hz / 1000))
    fields = {
        LAYOUT.P_MAGIC: LAYOUT.PARAMS_MAGIC,
        LAYOUT.P_NCPUS: p.vcpus,
        LAYOUT.P_HZ: p.timer_hz,
        LAYOUT.P_WS_BASE: LAYOUT.WS_BASE,
        LAYOUT.P_WS_PAGES: pages_per_cpu,
        LAYOUT.P_WRITE_FP: write_fp,
        LAYOUT.P_VERIFY_PER_TICK: verify_per_tick,
        LAYOUT.P_HB_TICKS: hb_ticks,
        LAYOUT.P_PIT_DIVISOR: round(PIT_HZ / p.timer_hz),
        LAYOUT.P_LAPIC_COUNT: LAPIC_BUS_HZ // p.timer_hz,
        LAYOUT.P_KVMCLOCK: 1 if p.kvmclock else 0,
        LAYOUT.P_TIMER_PIN: 0,    # KVM's default routing sends the PIT (GSI 0) to pin 0
        LAYOUT.P_PROBE_SYSCALL: 1 if p.probe_syscall else 0,
        LAYOUT.P_USE_RTC: 1 if p.use_rtc else 0,
        LAYOUT.P_FILL_ONCE: 1 if p.fill_once else 0,
    }
    block = bytearray(PAGE)
    for off, val in fields.items():
        struct.pack_into("<Q", block, off, val)
    return bytes(block)


def _gdt(vcpus: int) -> bytes:
    gdt = bytearray(PAGE)
    entries = {
        LAYOUT.KERNEL_CS: 0x00AF9A000000FFFF,    # 64-bit code, DPL0
        LAYOUT.KERNEL_DS: 0x00CF92000000FFFF,    # data, DPL0
        LAYOUT.USER_DS & ~3: 0x00CFF2000000FFFF,  # data, DPL3
        LAYOUT.USER_CS & ~3: 0x00AFFA000000FFFF,  # 64-bit code, DPL3
    }
    for sel, desc in entries.items():
        struct.pack_into("<Q", gdt, sel, desc)
    for cpu in range(vcpus):
        base = LAYOUT.TSS_BASE + cpu * LAYOUT.TSS_STRIDE
        limit = LAYOUT.TSS_LIMIT
        low = ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89 << 40) |
               (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56))
        struct.pack_into("<QQ", gdt, LAYOUT.TSS_SEL0 + 16 * cpu, low, base >> 32)
    return bytes(gdt)


def _tss_area(vcpus: int) -> bytes:
    """One TSS per CPU: the kernel stack for interrupts from CPL3, and an I/O
    permission bitmap that lets CPL3 code use ports 0-0x3ff (the serial port)."""
    area = bytearray(LAYOUT.MAX_CPUS * LAYOUT.TSS_STRIDE)
    for cpu in range(vcpus):
        off = cpu * LAYOUT.TSS_STRIDE
        rsp0 = LAYOUT.PERCPU_BASE + cpu * LAYOUT.PERCPU_SIZE + LAYOUT.KSTACK_TOP
        struct.pack_into("<Q", area, off + 4, rsp0)
        struct.pack_into("<H", area, off + 0x66, 104)   # I/O bitmap right after the TSS
        area[off + LAYOUT.TSS_LIMIT] = 0xFF            # bitmap terminator (ports >= 0x400)
    return bytes(area)


def _page_tables() -> list[tuple[int, bytes]]:
    """Identity map of the first 4 GiB with 2 MiB pages, user-accessible."""
    pml4 = bytearray(PAGE)
    pdpt = bytearray(PAGE)
    pml4_base = LAYOUT.PML4_BASE
    pdpt_base = pml4_base + PAGE
    struct.pack_into("<Q", pml4, 0, pdpt_base | 0x7)
    out = [(pml4_base, bytes(pml4))]
    for g in range(4):
        pd_base = pdpt_base + PAGE * (1 + g)
        struct.pack_into("<Q", pdpt, 8 * g, pd_base | 0x7)
        pd = bytearray(PAGE)
        for i in range(512):
            flags = 0x87 if g < 3 else 0x9F          # P|RW|US|PS (+PCD|PWT in the MMIO hole)
            struct.pack_into("<Q", pd, 8 * i, (g * GIB + i * (2 << 20)) | flags)
        out.append((pd_base, bytes(pd)))
    out.insert(1, (pdpt_base, bytes(pdpt)))
    return out


def boot_image(p: TestGuestParams) -> list[tuple[int, bytes]]:
    """(guest-physical address, bytes) pieces to write before the first run."""
    p.validate()
    return [
        (LAYOUT.GDT_BASE, _gdt(p.vcpus)),
        (LAYOUT.TSS_BASE, _tss_area(p.vcpus)),
        (LAYOUT.PARAMS, params_block(p)),
        *_page_tables(),
        (LAYOUT.CODE_BASE, guest_binary()),
    ]


def _segment(selector: int, code: bool, dpl: int = 0) -> kvm.Segment:
    s = kvm.Segment()
    s.base, s.limit, s.selector = 0, 0xFFFFFFFF, selector
    s.type = 11 if code else 3
    s.present, s.dpl, s.s, s.g = 1, dpl, 1, 1
    s.l, s.db = (1, 0) if code else (0, 1)
    return s


def initial_registers(cpu: int, sregs: kvm.Sregs) -> kvm.Regs:
    """Put vCPU `cpu` in 64-bit mode at kernel_entry; `sregs` is updated in place."""
    sregs.cs = _segment(LAYOUT.KERNEL_CS, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(LAYOUT.KERNEL_DS, code=False))
    tr = kvm.Segment()
    tr.base = LAYOUT.TSS_BASE + cpu * LAYOUT.TSS_STRIDE
    tr.limit, tr.selector, tr.type, tr.present = LAYOUT.TSS_LIMIT, LAYOUT.TSS_SEL0 + 16 * cpu, 11, 1
    sregs.tr = tr
    ldt = kvm.Segment()
    ldt.type, ldt.present, ldt.unusable = 2, 1, 1
    sregs.ldt = ldt
    sregs.gdt.base, sregs.gdt.limit = LAYOUT.GDT_BASE, PAGE - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = 0x80050033          # PG | AM | WP | NE | ET | MP | PE
    sregs.cr3 = LAYOUT.PML4_BASE
    sregs.cr4 = 0x620               # OSXMMEXCPT | OSFXSR | PAE
    sregs.efer = 0x500              # LMA | LME
    regs = kvm.Regs()
    regs.rip = LAYOUT.CODE_BASE
    regs.rdi = cpu
    regs.rsp = LAYOUT.PERCPU_BASE + cpu * LAYOUT.PERCPU_SIZE + LAYOUT.KSTACK_TOP
    regs.rflags = 0x2
    return regs
