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


def required_features(state: pb.VmState) -> list[str]:
    """What a reader must implement to restore `state` (at its own version)."""
    need = ["x86.vcpu", "x86.cpuid", "kvm.irqchip", "kvm.pit", "kvm.clock", "dev.uart16550",
            "dev.i8042"]
    kind = state.config.WhichOneof("guest")
    if kind == "test_guest":
        need.append("guest.testguest")
    elif kind == "linux":
        need.append("guest.linux")
    return need
