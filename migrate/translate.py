"""Translating a VM state tree between state versions.

One small named function per version step, in both directions, registered
here and nowhere else. The sender of a migration (or a checkpoint written for
an older target) translates down to the version the receiver reads; a reader
translates an older state up to its own. docs/compatibility.md explains when
a change needs a new version and how to add a step.

A step down may find state the older version cannot express. If the guest is
using it, the step raises NotExpressible naming the feature, and the
migration is refused before any memory moves; if the state is unused or at
its default, the step drops it silently (QEMU's subsection idea).
"""

from __future__ import annotations

from collections.abc import Callable

from vmigrate.migrate import versions
from vmigrate.proto import state_pb2 as pb


class NotExpressible(Exception):
    """The state uses something the target version cannot carry."""


Step = Callable[[pb.VmState], None]
UP: dict[int, Step] = {}      # UP[v]: v -> v + 1
DOWN: dict[int, Step] = {}    # DOWN[v]: v -> v - 1


def translate(state: pb.VmState, target: int) -> pb.VmState:
    """A copy of `state` at state version `target`."""
    out = pb.VmState()
    out.CopyFrom(state)
    version = state.state_version or 1
    if not versions.STATE_VERSION_MIN <= target <= versions.STATE_VERSION_MAX:
        raise NotExpressible(f"this vmigrate cannot write state version {target} "
                             f"(it writes {versions.STATE_VERSION_MIN}-"
                             f"{versions.STATE_VERSION_MAX})")
    while version < target:
        UP[version](out)
        version += 1
        out.state_version = version
    while version > target:
        DOWN[version](out)
        version -= 1
        out.state_version = version
    out.state_version = target
    out.ClearField("required_features")
    out.required_features.extend(required_features(out))
    return out


def skeleton(config: pb.VmConfig, features_in_use: list[str]) -> pb.VmState:
    """A state carrying only what decides translatability: the config and
    the features the running guest uses (VmmStatus.features_in_use). Lets a
    sender know, before it pauses anything, which versions it can write."""
    s = pb.VmState(state_version=versions.STATE_VERSION_MAX, config=config)
    if "dev.rtc" in features_in_use:
        s.devices.rtc.used = True
    return s


def writable_versions(config: pb.VmConfig, features_in_use: list[str]
                      ) -> tuple[dict[int, list[str]], dict[int, str]]:
    """For each state version this build writes: the features the guest's
    state needs there, or why it cannot be written at that version."""
    needs: dict[int, list[str]] = {}
    why_not: dict[int, str] = {}
    base = skeleton(config, features_in_use)
    for v in range(versions.STATE_VERSION_MAX, versions.STATE_VERSION_MIN - 1, -1):
        try:
            needs[v] = list(translate(base, v).required_features)
        except NotExpressible as e:
            why_not[v] = str(e)
    return needs, why_not


def required_features(state: pb.VmState) -> list[str]:
    """What a reader must implement to restore `state` (at its own version)."""
    need = ["x86.vcpu", "x86.cpuid", "kvm.irqchip", "kvm.pit", "kvm.clock", "dev.uart16550",
            "dev.i8042"]
    if state.devices.rtc.used:
        need.append("dev.rtc")
    kind = state.config.WhichOneof("guest")
    if kind == "test_guest":
        need.append("guest.testguest")
    elif kind == "linux":
        need.append("guest.linux")
    return need


# ---------------------------------------------------------------- 1 <-> 2: the RTC


def rtc_appears(state: pb.VmState) -> None:
    """1 -> 2. Version 1 had no RTC: the guest read 0xff from its ports, so it
    cannot depend on one; it gets an RTC in its reset state, untouched."""
    from vmigrate.vmm.devices.rtc import Rtc

    state.devices.rtc.CopyFrom(Rtc().save())
    state.devices.rtc.used = False


def rtc_goes(state: pb.VmState) -> None:
    """2 -> 1. Version 1 cannot carry an RTC: fine if the guest never touched
    it, a refusal if it did (its clock would be lost)."""
    if state.devices.rtc.used:
        raise NotExpressible(
            "the guest uses the CMOS real-time clock (dev.rtc), which state version 1 "
            "(vmigrate 0.1.0) cannot carry")
    state.devices.ClearField("rtc")


UP[1] = rtc_appears
DOWN[2] = rtc_goes
