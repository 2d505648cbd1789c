"""Every state translation step, in both directions (migrate/translate.py)."""

from __future__ import annotations

import pytest

from vmigrate.migrate import translate, versions
from vmigrate.proto import state_pb2 as pb


def _state(version: int, rtc_used: bool | None = None) -> pb.VmState:
    s = pb.VmState(state_version=version, config=pb.VmConfig(
        name="vm", memory_bytes=64 << 20, vcpu_count=1,
        test_guest=pb.TestGuestConfig(working_set_bytes=8 << 20)))
    s.vcpus.add(id=0).regs.rip = 0x100000
    s.devices.serial0.ier = 1
    if rtc_used is not None:
        s.devices.rtc.cmos = bytes(128)
        s.devices.rtc.used = rtc_used
        s.devices.rtc.offset_ns = 5_000_000_000
    return s


def test_window_includes_the_first_release():
    assert versions.STATE_VERSION_MIN == 1 <= versions.STATE_VERSION_MAX
    assert set(range(versions.STATE_VERSION_MIN, versions.STATE_VERSION_MAX)) == set(translate.UP)
    assert set(range(versions.STATE_VERSION_MIN + 1, versions.STATE_VERSION_MAX + 1)) == \
        set(translate.DOWN)


def test_up_1_to_2_gives_an_untouched_rtc():
    up = translate.translate(_state(1), 2)
    assert up.state_version == 2
    assert up.devices.HasField("rtc") and not up.devices.rtc.used
    assert len(up.devices.rtc.cmos) == 128 and up.devices.rtc.cmos[0x0D] == 0x80
    assert "dev.rtc" not in up.required_features
    # the rest of the state is untouched
    assert up.vcpus[0].regs.rip == 0x100000 and up.devices.serial0.ier == 1


def test_down_2_to_1_drops_an_unused_rtc():
    down = translate.translate(_state(2, rtc_used=False), 1)
    assert down.state_version == 1
    assert not down.devices.HasField("rtc")
    assert down.vcpus[0].regs.rip == 0x100000
    assert translate.translate(down, 2).devices.rtc.used is False


def test_down_2_to_1_refuses_a_used_rtc():
    with pytest.raises(translate.NotExpressible, match=r"dev\.rtc.*0\.1\.0"):
        translate.translate(_state(2, rtc_used=True), 1)


def test_required_features_follow_use():
    assert "dev.rtc" in translate.translate(_state(2, rtc_used=True), 2).required_features
    assert "dev.rtc" not in translate.translate(_state(2, rtc_used=False), 2).required_features


def test_the_input_is_not_modified():
    s = _state(2, rtc_used=False)
    translate.translate(s, 1)
    assert s.state_version == 2 and s.devices.HasField("rtc")


def test_versions_outside_the_window():
    with pytest.raises(translate.NotExpressible, match="cannot write state version 9"):
        translate.translate(_state(2), 9)


def test_writable_versions_says_why_not():
    config = _state(2).config
    needs, why = translate.writable_versions(config, [])
    assert set(needs) == {1, 2} and not why
    needs, why = translate.writable_versions(config, ["dev.rtc"])
    assert set(needs) == {2} and "dev.rtc" in why[1]
    assert "dev.rtc" in needs[2]
