"""The VMM on real KVM: the test guest boots, runs, and its complete state is
saved and re-created in a fresh VMM process without the guest noticing."""

from __future__ import annotations

import time

import pytest

from tests.guests import GuestProcess, copy_memory, guest_config
from vmigrate.proto import state_pb2 as pb
from vmigrate.proto import vmm_pb2
from vmigrate.vmm.testguest import report


def test_test_guest_boots_and_reports(short_tmp):
    g = GuestProcess(short_tmp / "a", guest_config(vcpus=2))
    try:
        g.client.boot()
        r = g.wait_heartbeats(3)
        assert r.clean(), (r.problems, r.gaps())
        # It really dirties memory: writes grow at roughly the configured rate.
        a = r.last(0)
        time.sleep(1.0)
        b = g.report().last(0)
        pages_per_s = (b.writes - a.writes) / ((b.ns - a.ns) / 1e9)
        assert 0.5 * 512 < pages_per_s < 1.5 * 512     # 4 MiB/s over 2 vCPUs = 512 pages/s each
        # ...and echoes what it is sent.
        g.client.console_write(b"are you there\n")
        deadline = time.monotonic() + 5
        while "are you there" not in g.report().echoes:
            assert time.monotonic() < deadline, "no echo from the guest"
            time.sleep(0.05)
    finally:
        g.close()


def _restore_in_fresh_process(short_tmp, config: pb.VmConfig) -> tuple[GuestProcess, bytes]:
    src = GuestProcess(short_tmp / "src", config)
    src.client.boot()
    src.wait_heartbeats(2)
    # A byte in flight: sent just before the pause, must be echoed after the restore.
    src.client.console_write(b"in-flight")
    src.client.pause()
    state = src.client.save()
    before = src.console()
    dst = GuestProcess(short_tmp / "dst", config)
    try:
        copy_memory(src.client, dst.client)
        dst.client.restore(state)
        dst.client.resume()
    finally:
        src.close()
    return dst, before


@pytest.mark.parametrize(("ws_mib", "rate_mib_s", "vcpus"), [
    (0, 0, 1),          # idle
    (8, 4, 1),
    (24, 64, 1),        # the working set rewritten ~3 times a second
    (16, 32, 2),
    (48, 256, 2),       # fast: a page every ~30 us per vCPU
])
def test_restore_in_fresh_process_continues(short_tmp, ws_mib, rate_mib_s, vcpus):
    config = guest_config(memory_mib=64, working_set_mib=ws_mib, rate_mib_s=rate_mib_s,
                               vcpus=vcpus)
    dst, before = _restore_in_fresh_process(short_tmp, config)
    try:
        last_before = report.parse_bytes(before)
        n0 = min(last_before.last(c).n for c in range(vcpus))
        dst.client.console_write(b"\n")
        r_after = dst.wait_heartbeats(3, after=n0)
        full = report.parse_bytes(before + dst.console())
        assert full.clean(), (full.problems, full.gaps())
        for c in range(vcpus):
            beats = full.heartbeats[c]
            assert beats[-1].n >= last_before.last(c).n + 3
            assert beats[-1].ns > last_before.last(c).ns     # kvmclock kept counting
        deadline = time.monotonic() + 5
        while "in-flight" not in dst.report().echoes:
            assert time.monotonic() < deadline, "the byte in flight was lost"
            time.sleep(0.05)
        assert r_after.last(0).errors == 0
    finally:
        dst.close()


# Fields that change with time alone, even while a VM is paused.
_TIME_MSRS = {0x10, 0x6E0}          # TSC, TSC deadline
_LAPIC_CURRENT_COUNT = 0x390


def _without_time(state: pb.VmState) -> pb.VmState:
    s = pb.VmState()
    s.CopyFrom(state)
    s.ClearField("clock")
    for ch in s.pit.channels:
        ch.count_load_time = 0
    for v in s.vcpus:
        msrs = [m for m in v.msrs if m.index not in _TIME_MSRS]
        del v.msrs[:]
        v.msrs.extend(msrs)
        lapic = bytearray(v.lapic)
        lapic[_LAPIC_CURRENT_COUNT:_LAPIC_CURRENT_COUNT + 4] = b"\0\0\0\0"
        v.lapic = bytes(lapic)
    return s


def test_every_component_round_trips(short_tmp):
    config = guest_config(vcpus=2, working_set_mib=4, rate_mib_s=8)
    src = GuestProcess(short_tmp / "a", config)
    dst = GuestProcess(short_tmp / "b", config)
    try:
        src.client.boot()
        src.wait_heartbeats(2)
        src.client.pause()
        first = src.client.save()
        dst.client.restore(first)
        second = dst.client.save()
        assert second.clock.clock_ns >= first.clock.clock_ns
        for a, b in zip(first.vcpus, second.vcpus, strict=True):
            tsc_a = {m.index: m.value for m in a.msrs}[0x10]
            tsc_b = {m.index: m.value for m in b.msrs}[0x10]
            assert tsc_a <= tsc_b
        a, b = _without_time(first), _without_time(second)
        for field in ("config", "memory", "irqchip", "pit", "devices"):
            assert getattr(a, field) == getattr(b, field), field
        for va, vb in zip(a.vcpus, b.vcpus, strict=True):
            for field in va.DESCRIPTOR.fields_by_name:
                assert getattr(va, field) == getattr(vb, field), f"vcpu {va.id}: {field}"
        assert a == b
        # The state is complete enough to be interesting.
        assert len(first.vcpus[0].msrs) > 20
        assert any(first.irqchip.ioapic.redirection)
        assert first.devices.serial0.ier == 1
    finally:
        src.close()
        dst.close()


def test_pause_resume_and_stop_leave_nothing_behind(short_tmp):
    g = GuestProcess(short_tmp / "a", guest_config())
    g.client.boot()
    g.wait_heartbeats(1)
    g.client.pause()
    n = g.report().last(0).n
    time.sleep(0.6)
    assert g.report().last(0).n == n                       # paused: no heartbeats
    assert g.client.status().state == vmm_pb2.VmmStatus.PAUSED
    g.client.resume()
    g.wait_heartbeats(2, after=n)
    pid = g.proc.pid
    g.close()
    assert g.proc.returncode == 0
    import os

    assert not os.path.exists(f"/proc/{pid}")
    assert not (short_tmp / "a" / "vmm.sock").exists()
    assert not (short_tmp / "a" / "vmm.pid").exists()
