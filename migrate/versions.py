"""What this build of vmigrate is and which state it can read and write.

Each release declares a window of state versions. Before a migration (or when
writing a checkpoint for a named target) the two ends compare windows and the
sender writes the highest version both know; migrate/translate.py converts a
state tree between adjacent versions. docs/compatibility.md is the policy.
"""

from __future__ import annotations

from importlib import metadata

from vmigrate.proto import agent_pb2

STATE_VERSION_MIN = 1       # 0.1.0's: this release talks to it in both directions
STATE_VERSION_MAX = 2       # 2: the CMOS real-time clock (dev.rtc)

# Features this build can restore. A state lists the ones it needs in
# VmState.required_features; a reader refuses a state needing one it lacks.
FEATURES = (
    "x86.vcpu",          # regs, sregs, xsave, xcrs, MSRs, LAPIC, events, MP state, debugregs
    "x86.cpuid",
    "kvm.irqchip",       # PIC x2 + IOAPIC
    "kvm.pit",
    "kvm.clock",
    "dev.uart16550",
    "dev.i8042",
    "dev.rtc",           # state version 2
    "guest.testguest",
    "guest.linux",
)


def software_version() -> str:
    try:
        return metadata.version("vmigrate")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def version_info() -> agent_pb2.VersionInfo:
    return agent_pb2.VersionInfo(software_version=software_version(),
                                 state_version_min=STATE_VERSION_MIN,
                                 state_version_max=STATE_VERSION_MAX,
                                 features=list(FEATURES))
