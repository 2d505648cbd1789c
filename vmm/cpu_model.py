"""The CPU a guest sees: CPUID templates and per-vCPU identity.

A template masks what KVM supports down to a named set, as Firecracker's CPU
templates do, so a guest started on one host can move to another whose CPU
has fewer features. The CPUID a vCPU was given is part of its saved state.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from vmigrate.vmm import kvm

# (leaf, subleaf, register) -> bits to clear
Mask = dict[tuple[int, int, str], int]


def _bits(*positions: int) -> int:
    v = 0
    for p in positions:
        v |= 1 << p
    return v


@dataclass(frozen=True)
class CpuTemplate:
    name: str
    description: str
    clear: Mask = field(default_factory=dict)

    def apply(self, entries: list[kvm.CpuidEntry2]) -> list[kvm.CpuidEntry2]:
        out = []
        for e in entries:
            c = kvm.CpuidEntry2.from_buffer_copy(bytes(e))
            for (leaf, sub, reg), mask in self.clear.items():
                if c.function == leaf and (c.index == sub or not
                                           c.flags & kvm.CPUID_FLAG_SIGNIFICANT_INDEX):
                    setattr(c, reg, getattr(c, reg) & ~mask)
            out.append(c)
        return out


TEMPLATES = {
    "host": CpuTemplate("host", "everything KVM on this host supports"),
    # x86-64-v2-like baseline: no AVX/AVX2/AVX-512, no TSX, no PKU, no SHA/VAES/GFNI, no
    # LA57, no user-mode-only features; what every x86-64 server of the last decade has.
    "baseline": CpuTemplate("baseline", "a conservative x86-64 feature set for mixed clusters", {
        (1, 0, "ecx"): _bits(28, 12, 29, 27),              # AVX, FMA, F16C, OSXSAVE (from xsave)
        (7, 0, "ebx"): _bits(5, 16, 17, 28, 30, 31, 26, 27, 4, 11, 29, 21),  # AVX2, AVX-512*, HLE,
        (7, 0, "ecx"): _bits(1, 3, 4, 6, 8, 9, 10, 11, 12, 14, 16),  # ... RTM, SHA, PKU, LA57, VAES
        (7, 0, "edx"): _bits(2, 3, 8, 23, 24, 22),          # AVX512_4*, VP2INTERSECT, AMX
        (0xD, 0, "eax"): _bits(2, 5, 6, 7, 9, 17, 18),       # XSAVE: AVX, AVX-512, PKRU, AMX
    }),
}


class UnknownTemplate(ValueError):
    pass


def template(name: str) -> CpuTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UnknownTemplate(f"unknown CPU template {name!r} (known: "
                              + ", ".join(sorted(TEMPLATES)) + ")") from None


def for_vcpu(entries: list[kvm.CpuidEntry2], index: int, count: int) -> list[kvm.CpuidEntry2]:
    """Give vCPU `index` its APIC ID and the topology of a `count`-CPU machine."""
    out = []
    for e in entries:
        c = kvm.CpuidEntry2.from_buffer_copy(bytes(e))
        if c.function == 1:
            c.ebx = (c.ebx & 0x0000FFFF) | (index << 24) | ((count & 0xFF) << 16)
            if count > 1:
                c.edx |= 1 << 28                     # HTT: more than one logical CPU
        elif c.function in (0xB, 0x1F):
            c.edx = index                            # x2APIC ID
        out.append(c)
    return out


def cpuid_bytes(entries: list[kvm.CpuidEntry2]) -> bytes:
    return b"".join(bytes(e) for e in entries)


def entry_size() -> int:
    return ctypes.sizeof(kvm.CpuidEntry2)
