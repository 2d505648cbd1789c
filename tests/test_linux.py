"""Real Linux guests (Debian's cloud kernel, the default image) in real VMM processes.

On a host whose KVM emulates guest kernel code (PVM) Linux boots slowly and
stops where it meets an instruction the host cannot run (docs/linux-guests.md);
these tests check what such a host can show — console output, a mid-boot
checkpoint restored in a fresh VMM process with continuous kernel timestamps,
the clear stop — and the full run to a shell and the workload where the
user-space probe passes. Times are printed (pytest -s) for the docs.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.guests import GuestProcess, copy_memory
from vmigrate.proto import state_pb2 as pb
from vmigrate.proto import vmm_pb2
from vmigrate.vmm import boot
from vmigrate.vmm.client import VmmError

MIB = 1 << 20
MEMORY = 128 * MIB
TIMESTAMP = re.compile(rb"^\[\s*(\d+\.\d+)\]", re.M)


@pytest.fixture(scope="module")
def image():
    """The default guest image, built (or reused) in the default image directory."""
    from vmigrate.vmm.image import ImageBuildError, build_image, default_image_dir

    try:
        return build_image(default_image_dir())
    except ImageBuildError as e:
        pytest.skip(f"no Linux guest image: {e}")


def linux_config(image, name: str = "lx", cmdline: str | None = None,
                 memory: int = MEMORY, vcpus: int = 1) -> pb.VmConfig:
    cfg = boot.linux_config(str(image.vmlinux), str(image.initramfs), cmdline)
    return pb.VmConfig(name=name, memory_bytes=memory, vcpu_count=vcpus, linux=cfg)


def wait_for(g: GuestProcess, pattern: bytes, timeout: float) -> float:
    """Seconds until `pattern` is on the console; fails with the console tail if
    the guest stops or the time runs out."""
    t0 = time.monotonic()
    while True:
        if pattern in g.console():
            return time.monotonic() - t0
        st = g.client.status()
        if st.state not in (vmm_pb2.VmmStatus.RUNNING, vmm_pb2.VmmStatus.CREATED):
            raise AssertionError(f"guest stopped before {pattern!r}: {st.detail}; console "
                                 f"tail: {g.console()[-600:]!r}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"no {pattern!r} within {timeout:.0f} s; console tail: "
                                 f"{g.console()[-600:]!r}")
        time.sleep(0.05)


def timestamps(console: bytes) -> list[float]:
    return [float(m) for m in TIMESTAMP.findall(console)]


def restore_in_fresh_process(src: GuestProcess, vm_dir: Path, config: pb.VmConfig,
                             wall_gap_s: float) -> tuple[GuestProcess, bytes]:
    """Pause and save `src`, wait `wall_gap_s`, restore into a new VMM process."""
    src.client.pause()
    state = src.client.save()
    before = src.console()
    time.sleep(wall_gap_s)                 # time the guest must not see pass
    dst = GuestProcess(vm_dir, config)
    try:
        copy_memory(src.client, dst.client)
        dst.client.restore(state)
        dst.client.resume()
    except BaseException:
        dst.close()
        raise
    finally:
        src.close()
    return dst, before


def assert_continuous(before: bytes, after: bytes, wall_gap_s: float) -> None:
    """Kernel timestamps never go back, and the checkpoint adds no jump."""
    t_before, t_after = timestamps(before), timestamps(after)
    assert t_before and t_after, (before[-300:], after[:300])
    assert t_after == sorted(t_after) and t_before == sorted(t_before)
    gap = t_after[0] - t_before[-1]
    assert 0 <= gap < wall_gap_s / 2, f"kernel time jumped by {gap:.3f} s across the restore"


# ---------------------------------------------------------------- fast subset


def test_debian_kernel_boots_to_console_output(image, short_tmp):
    g = GuestProcess(short_tmp / "a", linux_config(image))
    try:
        t0 = time.monotonic()
        g.client.boot()
        first = wait_for(g, b"Linux version", 120)
        wait_for(g, b"BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable", 30)
        out = g.console().decode(errors="replace")
        print(f"\nfirst console line after {first:.1f} s (boot call {time.monotonic() - t0:.1f} s)")
        assert image.kernel_version in out
        # The kernel read our zero page: our memory map and our command line.
        assert "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable" in out
        assert "Command line: console=ttyS0" in out
    finally:
        g.close()


def test_checkpoint_mid_boot_restores_in_a_fresh_process(image, short_tmp):
    config = linux_config(image)
    src = GuestProcess(short_tmp / "src", config)
    src.client.boot()
    try:
        wait_for(src, b"tsc: Detected", 120)      # kvm-clock is the clock: timestamps run
    except BaseException:
        src.close()
        raise
    dst, before = restore_in_fresh_process(src, short_tmp / "dst", config, wall_gap_s=4.0)
    try:
        wait_for(dst, b"Zone ranges", 120)       # several lines later in the boot
        after = dst.console()[len(before):] if dst.console().startswith(before) else \
            dst.console()
        assert_continuous(before, after, wall_gap_s=4.0)
    finally:
        dst.close()


def test_linux_config_errors_reach_the_boot_call(image, short_tmp):
    # Two vCPUs: refused with one line at boot, the VMM stays up.
    g = GuestProcess(short_tmp / "a", linux_config(image, vcpus=2))
    try:
        with pytest.raises(VmmError, match=r"Linux guests run with 1 vCPU here") as e:
            g.client.boot()
        assert "\n" not in str(e.value)
        assert g.client.status().state == vmm_pb2.VmmStatus.CREATED
    finally:
        g.close()
    # Too little memory for kernel + initramfs.
    g = GuestProcess(short_tmp / "b", linux_config(image, memory=64 * MIB))
    try:
        with pytest.raises(VmmError, match=r"kernel needs|does not fit in guest memory"):
            g.client.boot()
    finally:
        g.close()


# ---------------------------------------------------------------- long


@pytest.mark.slow
def test_boot_milestones_checkpoint_with_interrupts_on_and_the_end(image, short_tmp):
    """Boot as far as this host goes, with a checkpoint once timer interrupts run."""
    config = linux_config(image)
    src = GuestProcess(short_tmp / "src", config)
    t0 = time.monotonic()
    src.client.boot()
    milestones: dict[str, float] = {}
    try:
        for name, pattern in (("first console line", b"Linux version"),
                              ("memory map", b"Zone ranges"),
                              ("percpu set up", b"setup_percpu"),
                              ("memory up (mm_init)", b"Memory: "),
                              ("interrupts on, console", b"Console: colour")):
            wait_for(src, pattern, 400)
            milestones[name] = time.monotonic() - t0
    except BaseException:
        src.close()
        raise
    dst, before = restore_in_fresh_process(src, short_tmp / "dst", config, wall_gap_s=4.0)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            st = dst.client.status()
            if st.state != vmm_pb2.VmmStatus.RUNNING or b"Run /init" in dst.console():
                break
            time.sleep(0.2)
        out = dst.console()
        after = out[len(before):] if out.startswith(before) else out
        assert_continuous(before, after, wall_gap_s=4.0)
        assert b"Calibrating delay loop" in after         # it kept booting after the restore
        milestones["end"] = time.monotonic() - t0
        print("\n" + "\n".join(f"{k:28s} {v:7.1f} s" for k, v in milestones.items()))
        print(f"end state: {st.state}, {st.detail}")
        if boot.host_emulates_guest_kernel() and st.state == vmm_pb2.VmmStatus.CRASHED:
            # This host's KVM cannot run some kernel instruction: the VMM says which.
            assert "an instruction KVM on this host could not emulate" in st.detail
            assert re.search(r"`[a-z0-9 ]+`", st.detail), st.detail
        else:
            assert b"Run /init" in out, out[-600:]
    finally:
        dst.close()


@pytest.mark.slow
def test_linux_guest_reaches_user_space_and_runs_its_workload(image, short_tmp, tmp_path):
    from vmigrate.vmm import probe
    from vmigrate.vmm.image import kernel_cmdline
    from vmigrate.vmm.image.console import parse_console

    ok, detail = probe.cached_result(tmp_path)
    if not ok:
        pytest.skip(f"this host cannot run guest user space: {detail}")
    cmdline = boot.default_cmdline(kernel_cmdline("16M", "1M").replace("console=ttyS0", ""))
    g = GuestProcess(short_tmp / "a", linux_config(image, cmdline=cmdline))
    try:
        g.client.boot()
        wait_for(g, b"vmigrate-guest:", 300)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = parse_console(g.console().decode(errors="replace"))
            if len(r.heartbeats) >= 3:
                break
            time.sleep(0.5)
        assert len(r.heartbeats) >= 3 and r.errors == 0 and not r.crashes, g.console()[-800:]
    finally:
        g.close()
