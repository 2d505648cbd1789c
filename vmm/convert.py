"""Conversions between KVM's C structures and the state messages.

The messages name their fields after the kernel's, so most conversions are a
loop over fields; the exceptions (nested structs, arrays, renamed fields)
are spelled out.
"""

from __future__ import annotations

import ctypes
from typing import Any

from google.protobuf.message import Message

from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm import kvm


def _flat_to_msg(obj: ctypes.Structure, msg: Message, skip: tuple[str, ...] = ()) -> Message:
    fields = msg.DESCRIPTOR.fields_by_name
    for name, _ in obj._fields_:
        if name in skip or name not in fields:
            continue
        value = getattr(obj, name)
        if fields[name].type == fields[name].TYPE_BOOL:
            value = bool(value)
        setattr(msg, name, value)
    return msg


def _flat_from_msg(msg: Message, cls: type[kvm.Struct], skip: tuple[str, ...] = ()) -> Any:
    obj = cls()
    fields = msg.DESCRIPTOR.fields_by_name
    for name, _ in cls._fields_:
        if name in skip or name not in fields:
            continue
        setattr(obj, name, int(getattr(msg, name)))
    return obj


# ---- regs
def regs_to_msg(r: kvm.Regs) -> pb.Regs:
    return _flat_to_msg(r, pb.Regs())


def regs_from_msg(m: pb.Regs) -> kvm.Regs:
    return _flat_from_msg(m, kvm.Regs)


# ---- sregs
def segment_to_msg(s: kvm.Segment) -> pb.Segment:
    return _flat_to_msg(s, pb.Segment())


def segment_from_msg(m: pb.Segment) -> kvm.Segment:
    return _flat_from_msg(m, kvm.Segment)


def sregs_to_msg(s: kvm.Sregs) -> pb.Sregs:
    m = pb.Sregs()
    for name in kvm.SEGMENT_NAMES:
        getattr(m, name).CopyFrom(segment_to_msg(getattr(s, name)))
    for name in ("gdt", "idt"):
        getattr(m, name).base = getattr(s, name).base
        getattr(m, name).limit = getattr(s, name).limit
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        setattr(m, name, getattr(s, name))
    m.interrupt_bitmap.extend(s.interrupt_bitmap)
    return m


def sregs_from_msg(m: pb.Sregs) -> kvm.Sregs:
    s = kvm.Sregs()
    for name in kvm.SEGMENT_NAMES:
        setattr(s, name, segment_from_msg(getattr(m, name)))
    for name in ("gdt", "idt"):
        getattr(s, name).base = getattr(m, name).base
        getattr(s, name).limit = getattr(m, name).limit
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        setattr(s, name, getattr(m, name))
    for i, v in enumerate(list(m.interrupt_bitmap)[:4]):
        s.interrupt_bitmap[i] = v
    return s


# ---- events
def events_to_msg(e: kvm.VcpuEvents) -> pb.VcpuEvents:
    return pb.VcpuEvents(
        exception_injected=bool(e.exception.injected), exception_nr=e.exception.nr,
        exception_has_error_code=bool(e.exception.has_error_code),
        exception_pending=bool(e.exception.pending), exception_error_code=e.exception.error_code,
        interrupt_injected=bool(e.interrupt.injected), interrupt_nr=e.interrupt.nr,
        interrupt_soft=bool(e.interrupt.soft), interrupt_shadow=e.interrupt.shadow,
        nmi_injected=bool(e.nmi.injected), nmi_pending=bool(e.nmi.pending),
        nmi_masked=bool(e.nmi.masked), sipi_vector=e.sipi_vector, flags=e.flags,
        smi_smm=bool(e.smi.smm), smi_pending=bool(e.smi.pending),
        smi_inside_nmi=bool(e.smi.smm_inside_nmi), smi_latched_init=bool(e.smi.latched_init),
        triple_fault_pending=bool(e.triple_fault_pending),
        exception_has_payload=bool(e.exception_has_payload),
        exception_payload=e.exception_payload)


def events_from_msg(m: pb.VcpuEvents) -> kvm.VcpuEvents:
    e = kvm.VcpuEvents()
    e.exception.injected, e.exception.nr = m.exception_injected, m.exception_nr
    e.exception.has_error_code = m.exception_has_error_code
    e.exception.pending, e.exception.error_code = m.exception_pending, m.exception_error_code
    e.interrupt.injected, e.interrupt.nr = m.interrupt_injected, m.interrupt_nr
    e.interrupt.soft, e.interrupt.shadow = m.interrupt_soft, m.interrupt_shadow
    e.nmi.injected, e.nmi.pending, e.nmi.masked = m.nmi_injected, m.nmi_pending, m.nmi_masked
    e.sipi_vector, e.flags = m.sipi_vector, m.flags
    e.smi.smm, e.smi.pending = m.smi_smm, m.smi_pending
    e.smi.smm_inside_nmi, e.smi.latched_init = m.smi_inside_nmi, m.smi_latched_init
    e.triple_fault_pending = m.triple_fault_pending
    e.exception_has_payload, e.exception_payload = m.exception_has_payload, m.exception_payload
    return e


# ---- debug registers
def debugregs_to_msg(d: kvm.Debugregs) -> pb.DebugRegs:
    return pb.DebugRegs(db=list(d.db), dr6=d.dr6, dr7=d.dr7, flags=d.flags)


def debugregs_from_msg(m: pb.DebugRegs) -> kvm.Debugregs:
    d = kvm.Debugregs()
    for i, v in enumerate(list(m.db)[:4]):
        d.db[i] = v
    d.dr6, d.dr7, d.flags = m.dr6, m.dr7, m.flags
    return d


# ---- XCRs
def xcrs_to_msg(x: kvm.Xcrs) -> list[pb.Xcr]:
    return [pb.Xcr(index=x.xcrs[i].xcr, value=x.xcrs[i].value) for i in range(x.nr_xcrs)]


def xcrs_from_msg(items: list[pb.Xcr]) -> kvm.Xcrs:
    x = kvm.Xcrs()
    x.nr_xcrs = len(items)
    for i, item in enumerate(items[:kvm.MAX_XCRS]):
        x.xcrs[i].xcr, x.xcrs[i].value = item.index, item.value
    return x


# ---- CPUID
def cpuid_to_msg(entries: list[kvm.CpuidEntry2]) -> list[pb.CpuidEntry]:
    return [_flat_to_msg(e, pb.CpuidEntry()) for e in entries]


def cpuid_from_msg(items: list[pb.CpuidEntry]) -> list[kvm.CpuidEntry2]:
    return [_flat_from_msg(m, kvm.CpuidEntry2) for m in items]


# ---- irqchip, PIT, clock
def pic_to_msg(raw: bytes) -> pb.PicState:
    return _flat_to_msg(kvm.PicState.from_buffer_copy(raw[:ctypes.sizeof(kvm.PicState)]),
                        pb.PicState())


def pic_from_msg(m: pb.PicState) -> bytes:
    return bytes(_flat_from_msg(m, kvm.PicState))


def ioapic_to_msg(raw: bytes) -> pb.IoapicState:
    s = kvm.IoapicState.from_buffer_copy(raw[:ctypes.sizeof(kvm.IoapicState)])
    return pb.IoapicState(base_address=s.base_address, ioregsel=s.ioregsel, id=s.id, irr=s.irr,
                          redirection=list(s.redirtbl))


def ioapic_from_msg(m: pb.IoapicState) -> bytes:
    s = kvm.IoapicState()
    s.base_address, s.ioregsel, s.id, s.irr = m.base_address, m.ioregsel, m.id, m.irr
    for i, v in enumerate(list(m.redirection)[:kvm.IOAPIC_NUM_PINS]):
        s.redirtbl[i] = v
    return bytes(s)


def pit_to_msg(p: kvm.PitState2) -> pb.PitState:
    return pb.PitState(channels=[_flat_to_msg(c, pb.PitChannel()) for c in p.channels],
                       flags=p.flags)


def pit_from_msg(m: pb.PitState) -> kvm.PitState2:
    p = kvm.PitState2()
    for i, c in enumerate(list(m.channels)[:3]):
        p.channels[i] = _flat_from_msg(c, kvm.PitChannelState)
    p.flags = m.flags
    return p


def clock_to_msg(c: kvm.ClockData) -> pb.ClockState:
    return pb.ClockState(clock_ns=c.clock, flags=c.flags, realtime_ns=c.realtime,
                         host_tsc=c.host_tsc)


def clock_from_msg(m: pb.ClockState) -> kvm.ClockData:
    c = kvm.ClockData()
    c.clock = m.clock_ns
    return c
