#!/usr/bin/env python3
"""QEMU's own live migration and checkpoint/restore, measured on vmigrate's Linux guest.

The peer our benchmarks compare against: Debian's qemu-system-x86 with TCG
(KVM here cannot run guest user space, see shared/KVM-NOTES.md), 1 vCPU,
booting the image from ``vmigrate.vmm.image`` with the dirtying, self-checking
workload. QEMU is driven over QMP with the ``qemu.qmp`` package.

Live migration runs on loopback: the destination starts with ``-incoming
defer`` and listens on a port the kernel picks (``tcp:127.0.0.1:0``), the
source migrates once the workload has printed heartbeats. The numbers come
from ``query-migrate``; the guest pause is also measured from QMP event
timestamps (source STOP to destination RESUME). Afterwards the destination
guest must keep printing heartbeats with ``errors=0`` through a full
verification pass of its working set: a migration that loses or mixes memory
shows up there, and is reported, not hidden.

Checkpoint/restore uses ``migrate exec:cat > FILE`` (QEMU 7.2 has no ``file:``
URI) and a fresh QEMU with ``-incoming "exec:cat FILE"``.

Library use::

    from qemu_peer import SCENARIOS, CONFIGS, run_live_migration, run_checkpoint_restore
    r = run_live_migration(SCENARIOS["ws256-50"], CONFIGS["fast"])

Command line: ``python tests/bench/qemu_peer.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from vmigrate.vmm.image import GuestImage, build_image, default_image_dir, kernel_cmdline
from vmigrate.vmm.image.console import ConsoleReport, parse_console

QEMU = os.environ.get("VMIGRATE_QEMU", "qemu-system-x86_64")
MIB = 1 << 20
FAST_BANDWIDTH = 10 * 10**9  # bytes/s, "cap lifted" (QEMU 7.2's default is 128 MiB/s)
BOOT_TIMEOUT_S = 180.0  # QEMU start to the workload's first heartbeat
QMP_TIMEOUT_S = 30.0  # any single QMP command
FIRST_HB_TIMEOUT_S = 30.0  # a resumed guest prints a heartbeat every second
CHECK_TIMEOUT_S = 120.0  # destination guest: a full verification pass after resuming
POLL_S = 0.1


class QemuPeerError(Exception):
    """A QEMU run failed; the message says which step and why."""


# -- what to run -------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    mem_mib: int  # guest RAM
    ws_mib: int  # the workload's working set
    rate_mibs: int  # the workload's dirty rate, MiB/s (0 = idle)
    timeout_s: float  # give up on a migration that has not converged by then
    auto_converge: bool = False  # throttle the vCPU when pre-copy does not converge
    kernel_args: str = ""  # appended to the guest kernel command line
    description: str = ""


@dataclass(frozen=True)
class MigrationConfig:
    name: str
    max_bandwidth: int | None = None  # bytes/s; None keeps QEMU's default
    multifd_channels: int = 0  # 0 = classic single-stream migration
    auto_converge: bool | None = None  # None: as the scenario says
    accel: str = "tcg"  # e.g. "tcg,thread=single" for QEMU's round-robin TCG
    description: str = ""


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("idle", 1024, 256, 0, 60, description="1 GiB guest, 256 MiB set, not dirtying"),
        Scenario("ws256-50", 1024, 256, 50, 60, description="256 MiB set at 50 MiB/s"),
        Scenario("ws256-200", 1024, 256, 200, 60, description="256 MiB set at 200 MiB/s"),
        Scenario(
            "ws512-800", 1024, 512, 800, 120, auto_converge=True,
            description="512 MiB set at 800 MiB/s, auto-converge",
        ),
    )
}  # fmt: skip

CONFIGS: dict[str, MigrationConfig] = {
    c.name: c
    for c in (
        MigrationConfig("default", description="QEMU defaults (128 MiB/s cap)"),
        MigrationConfig("fast", FAST_BANDWIDTH, description="max-bandwidth 10 GB/s"),
        MigrationConfig("multifd2", FAST_BANDWIDTH, 2, description="10 GB/s, multifd 2 ch"),
        MigrationConfig(
            "fast-single",
            FAST_BANDWIDTH,
            accel="tcg,thread=single",
            description="10 GB/s, single-threaded (round-robin) TCG",
        ),
    )
}


# -- results -----------------------------------------------------------------------


@dataclass
class GuestCheck:
    """What the guest itself said after the migration or restore."""

    ok: bool | None = None  # heartbeats advancing, a full pass verified, no errors
    heartbeats: int = 0
    errors: int | None = None
    corrupt: list[str] = field(default_factory=list)  # first few CORRUPT lines
    crashes: list[str] = field(default_factory=list)  # first few panic/Oops/segfault lines
    hb_gap: int | None = None  # first destination HB number minus the last source one
    note: str = ""


@dataclass
class QemuMigrationResult:
    scenario: str
    config: str
    status: str = "not run"  # completed | timeout | failed | error
    total_time_ms: int | None = None
    downtime_ms: int | None = None  # as QEMU reports it
    pause_ms: float | None = None  # source STOP event to destination RESUME event
    setup_time_ms: int | None = None
    transferred_bytes: int | None = None  # ram.transferred
    ram_total_bytes: int | None = None
    zero_pages: int | None = None  # ram.duplicate
    normal_pages: int | None = None
    multifd_bytes: int | None = None
    mbps: float | None = None
    dirty_sync_count: int | None = None
    max_throttle_pct: int = 0
    wall_s: float | None = None  # migrate command to the end, measured here
    boot_s: float | None = None  # QEMU start to the first heartbeat
    guest_rate_before_mibs: float | None = None  # measured from the heartbeats
    guest_rate_during_mibs: float | None = None
    guest: GuestCheck = field(default_factory=GuestCheck)
    parameters: dict[str, Any] = field(default_factory=dict)
    qemu_version: str = ""
    load_avg: float | None = None
    error: str | None = None
    final_info: dict[str, Any] = field(default_factory=dict)  # the last query-migrate


@dataclass
class QemuCheckpointResult:
    mem_mib: int
    mode: str  # "stopped" (stop, then save) or "running" (pre-copy into the file)
    ws_mib: int
    rate_mibs: int
    status: str = "not run"
    file_bytes: int | None = None
    checkpoint_ms: float | None = None  # command (or stop) to migration completed
    qemu_total_time_ms: int | None = None
    downtime_ms: int | None = None  # as QEMU reports it
    pause_ms: float | None = None  # source STOP to RESUME (after `cont`), from events
    restore_ms: float | None = None  # restore QEMU started to guest running
    restore_to_heartbeat_ms: float | None = None  # restore QEMU started to the first HB
    guest: GuestCheck = field(default_factory=GuestCheck)
    qemu_version: str = ""
    load_avg: float | None = None
    error: str | None = None


# -- QEMU processes ----------------------------------------------------------------

_LIVE: set[subprocess.Popen[bytes]] = set()


def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        _LIVE.discard(proc)


atexit.register(_kill_leftovers)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL QEMU when this Python process dies, however."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _event_time(event: dict[str, Any]) -> float:
    ts = event["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


class QemuVM:
    """One QEMU process: TCG, 1 vCPU, the guest image, serial console to a file, QMP."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        image: GuestImage,
        mem_mib: int,
        cmdline: str,
        incoming: str | None = None,
        accel: str = "tcg",
    ) -> None:
        self.name = name
        self.serial = workdir / f"{name}.serial"
        self.qmp_path = workdir / f"{name}.qmp"
        self.log = workdir / f"{name}.log"
        self.argv = [
            QEMU, "-accel", accel, "-machine", "pc", "-smp", "1", "-m", str(mem_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{self.serial}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel", str(image.bzimage), "-initrd", str(image.initramfs),
            "-append", cmdline,
        ]  # fmt: skip
        if incoming:
            self.argv += ["-incoming", incoming]
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp = QMPClient(name)
        self.started = 0.0  # time.monotonic() at launch
        self.started_wall = 0.0  # time.time() at launch, to compare with event timestamps

    async def start(self) -> None:
        with self.log.open("wb") as log:
            self.started, self.started_wall = time.monotonic(), time.time()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our Ctrl-C handling decides when QEMU goes
                preexec_fn=_die_with_parent,
            )
        _LIVE.add(self.proc)
        deadline = time.monotonic() + QMP_TIMEOUT_S
        while not self.qmp_path.exists():
            self._check_alive("starting")
            if time.monotonic() > deadline:
                raise QemuPeerError(f"{self.name}: no QMP socket after {QMP_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.02)
        try:
            await asyncio.wait_for(self.qmp.connect(str(self.qmp_path)), QMP_TIMEOUT_S)
        except (TimeoutError, QMPError, OSError) as exc:
            raise QemuPeerError(f"{self.name}: cannot connect to QMP: {exc}")

    def _check_alive(self, doing: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise QemuPeerError(
                f"{self.name}: QEMU exited with status {self.proc.returncode} while {doing}: "
                + " | ".join(tail)
            )

    async def cmd(self, command: str, args: dict[str, Any] | None = None) -> Any:
        """Run one QMP command, bounded by QMP_TIMEOUT_S."""
        try:
            return await asyncio.wait_for(self.qmp.execute(command, args), QMP_TIMEOUT_S)
        except TimeoutError:
            self._check_alive(f"running {command}")
            raise QemuPeerError(f"{self.name}: QMP {command} got no answer in {QMP_TIMEOUT_S} s")
        except ExecuteError as exc:
            raise QemuPeerError(f"{self.name}: QMP {command} failed: {exc}")
        except QMPError as exc:
            self._check_alive(f"running {command}")
            raise QemuPeerError(f"{self.name}: QMP {command}: {exc!r}")

    def console(self) -> ConsoleReport:
        try:
            return parse_console(self.serial.read_text(errors="replace"))
        except FileNotFoundError:
            return ConsoleReport()

    async def wait_console(
        self, ready: Callable[[ConsoleReport], bool], timeout: float, what: str
    ) -> ConsoleReport:
        """Poll the serial console until ready(report) holds."""
        deadline = time.monotonic() + timeout
        while True:
            report = self.console()
            if ready(report):
                return report
            self._check_alive(f"waiting for {what}")
            if time.monotonic() > deadline:
                raise QemuPeerError(f"{self.name}: no {what} within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def wait_running(self, timeout: float, resume_paused: bool = False) -> float:
        """Poll query-status until the guest runs; returns time.monotonic() then.

        An incoming migration of a guest that was paused on the source ends
        paused here too (QEMU migrates the run state): resume_paused sends
        `cont` then, as a management layer would.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = await self.cmd("query-status")
            if status.get("running"):
                return time.monotonic()
            if resume_paused and status.get("status") in ("paused", "postmigrate"):
                await _cont(self)
                continue
            if status.get("status") in ("internal-error", "shutdown", "guest-panicked"):
                raise QemuPeerError(f"{self.name}: guest is {status['status']}")
            if time.monotonic() > deadline:
                raise QemuPeerError(f"{self.name}: not running after {timeout:.0f} s: {status}")
            await asyncio.sleep(0.02)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.qmp.events.history if e.get("event") == name]

    async def version(self) -> str:
        v = (await self.cmd("query-version"))["qemu"]
        return f"{v['major']}.{v['minor']}.{v['micro']}"

    async def close(self) -> None:
        """Stop QEMU and reap it; safe to call twice, also after a failure."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp.disconnect(), 2)
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            _LIVE.discard(proc)


# -- helpers -----------------------------------------------------------------------


def _require_qemu() -> None:
    if shutil.which(QEMU) is None:
        raise QemuPeerError(f"{QEMU} not found: apt-get install qemu-system-x86")


def _image(image: GuestImage | None) -> GuestImage:
    return image if image is not None else build_image(default_image_dir())


async def _poll_migration(
    vm: QemuVM, timeout: float, on_throttle: Callable[[int], None] | None = None
) -> tuple[dict[str, Any], bool]:
    """Poll query-migrate until the migration ends; returns (last info, timed out)."""
    deadline = time.monotonic() + timeout
    while True:
        info = await vm.cmd("query-migrate")
        if on_throttle is not None:
            on_throttle(int(info.get("cpu-throttle-percentage", 0)))
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info, False
        if time.monotonic() > deadline:
            return info, True
        # Completion wakes us at once (the MIGRATION event); else poll for statistics.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_migration_event(vm), POLL_S)


async def _final_info(vm: QemuVM, info: dict[str, Any]) -> dict[str, Any]:
    """query-migrate once QEMU has filled in the totals.

    QEMU 7.2 reports "completed" (and sends the event) a moment before its
    migration thread has computed total-time and downtime, which read 0 then.
    """
    deadline = time.monotonic() + 5
    while info.get("status") == "completed" and not info.get("total-time"):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
        info = await vm.cmd("query-migrate")
    return info


async def _cont(vm: QemuVM, timeout: float = 10) -> None:
    """`cont`, retried while QEMU still finalizes the migration it just completed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await vm.cmd("cont")
            return
        except QemuPeerError as exc:
            if "not finalized" not in str(exc) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.005)


async def _migration_event(vm: QemuVM) -> None:
    while True:
        event = await vm.qmp.events.get()
        if event.get("event") == "MIGRATION" and event["data"].get("status") in (
            "completed",
            "failed",
            "cancelled",
        ):
            return


async def _check_guest(vm: QemuVM, check: GuestCheck, last_source_hb: int | None) -> None:
    """Wait for the guest to verify its whole working set again; record what it said."""

    def verified(r: ConsoleReport) -> bool:
        return len(r.heartbeats) >= 3 and r.heartbeats[-1].passes >= p0 + 2

    p0 = 0
    try:
        first = await vm.wait_console(
            lambda r: bool(r.heartbeats or r.crashes), FIRST_HB_TIMEOUT_S, "heartbeat"
        )
        if first.heartbeats:
            p0 = first.heartbeats[0].passes
            await vm.wait_console(
                lambda r: bool(r.corrupt or r.crashes) or verified(r),
                CHECK_TIMEOUT_S,
                "full verification pass",
            )
    except QemuPeerError as exc:
        check.note = str(exc)
    report = vm.console()
    if (report.corrupt or report.crashes) and vm.proc is not None and vm.proc.poll() is None:
        await asyncio.sleep(3)  # let it go on a little: how many pages are hit?
        report = vm.console()
    check.heartbeats = len(report.heartbeats)
    check.errors = report.errors
    check.corrupt = report.corrupt[:5]
    check.crashes = report.crashes[:5]
    if report.crashes:
        check.note = f"guest crashed: {report.crashes[0]}"
    if last_source_hb is not None and report.heartbeats:
        check.hb_gap = report.heartbeats[0].n - last_source_hb
    check.ok = not check.note and check.errors == 0 and verified(report)


def _fill_from_info(res: QemuMigrationResult, info: dict[str, Any]) -> None:
    ram = info.get("ram", {})
    res.final_info = info
    res.total_time_ms = info.get("total-time")
    res.downtime_ms = info.get("downtime")
    res.setup_time_ms = info.get("setup-time")
    res.transferred_bytes = ram.get("transferred")
    res.ram_total_bytes = ram.get("total")
    res.zero_pages = ram.get("duplicate")
    res.normal_pages = ram.get("normal")
    res.multifd_bytes = ram.get("multifd-bytes")
    res.mbps = ram.get("mbps")
    res.dirty_sync_count = ram.get("dirty-sync-count")


def _rate_mibs(report: ConsoleReport, first: int) -> float | None:
    if len(report.heartbeats) - first < 2:
        return None
    rate = ConsoleReport(report.heartbeats[first:]).dirty_rate()
    return None if rate is None else rate / MIB


# -- live migration ----------------------------------------------------------------


async def live_migration(
    scenario: Scenario,
    config: MigrationConfig,
    image: GuestImage | None = None,
    keep_dir: Path | None = None,
) -> QemuMigrationResult:
    """Boot a source and a destination QEMU, migrate once, check the guest after."""
    _require_qemu()
    image = _image(image)
    res = QemuMigrationResult(scenario.name, config.name, load_avg=os.getloadavg()[0])
    auto_converge = (
        config.auto_converge if config.auto_converge is not None else scenario.auto_converge
    )
    cmdline = kernel_cmdline(
        scenario.ws_mib * MIB, scenario.rate_mibs * MIB, extra=scenario.kernel_args
    )
    with tempfile.TemporaryDirectory(prefix="qemu-peer-") as tmp:
        work = Path(tmp)
        src = QemuVM("src", work, image, scenario.mem_mib, cmdline, accel=config.accel)
        dst = QemuVM(
            "dst", work, image, scenario.mem_mib, cmdline, incoming="defer", accel=config.accel
        )
        try:
            await asyncio.gather(src.start(), dst.start())
            res.qemu_version = await src.version()
            await _configure(src, dst, config, auto_converge, res)
            await dst.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            port = (await dst.cmd("query-migrate"))["socket-address"][0]["port"]

            await src.wait_console(lambda r: bool(r.heartbeats), BOOT_TIMEOUT_S, "heartbeat")
            res.boot_s = time.monotonic() - src.started
            before = await src.wait_console(
                lambda r: len(r.heartbeats) >= 3, 30, "three heartbeats"
            )
            res.guest_rate_before_mibs = _rate_mibs(before, 1)
            hb_at_start = len(before.heartbeats)

            t0 = time.monotonic()
            await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})

            def throttle(pct: int) -> None:
                res.max_throttle_pct = max(res.max_throttle_pct, pct)

            info, timed_out = await _poll_migration(src, scenario.timeout_s, throttle)
            res.wall_s = time.monotonic() - t0
            info = await _final_info(src, info)
            _fill_from_info(res, info)
            during = src.console()
            res.guest_rate_during_mibs = _rate_mibs(during, hb_at_start - 1)

            if timed_out:
                res.status = "timeout"
                await src.cmd("migrate_cancel")
                info, _ = await _poll_migration(src, 30)
                # The source keeps the guest: it must still be intact.
                await _check_guest_continues(src, res.guest)
            elif info.get("status") != "completed":
                res.status = info.get("status", "failed")
                res.error = info.get("error-desc")
                await _check_guest_continues(src, res.guest)
            else:
                res.status = "completed"
                with contextlib.suppress(QemuPeerError):  # a crashed guest is checked below
                    await dst.wait_running(30)
                stops, resumes = src.events("STOP"), dst.events("RESUME")
                if stops and resumes:
                    res.pause_ms = (_event_time(resumes[-1]) - _event_time(stops[-1])) * 1e3
                last_src = during.heartbeats[-1].n if during.heartbeats else None
                await _check_guest(dst, res.guest, last_src)
                if during.corrupt:  # corruption on the source side before the switch
                    res.guest.ok = False
                    res.guest.corrupt = during.corrupt[:5] + res.guest.corrupt
        except QemuPeerError as exc:
            res.status, res.error = "error", str(exc)
        finally:
            await asyncio.gather(src.close(), dst.close())
            if keep_dir is not None:
                _keep(work, keep_dir / f"{scenario.name}-{config.name}")
    return res


async def _check_guest_continues(vm: QemuVM, check: GuestCheck) -> None:
    """After a migration that did not complete: the source guest must go on, errors=0."""
    n = len(vm.console().heartbeats)
    try:
        await vm.wait_console(
            lambda r: len(r.heartbeats) >= n + 3 or bool(r.crashes), 30, "heartbeats"
        )
    except QemuPeerError as exc:
        check.note = str(exc)
    report = vm.console()
    check.heartbeats = len(report.heartbeats) - n
    check.errors = report.errors
    check.corrupt = report.corrupt[:5]
    check.crashes = report.crashes[:5]
    check.ok = not check.note and check.errors == 0 and not report.crashes
    check.note = check.note or "source kept the guest (migration did not complete)"


async def _configure(
    src: QemuVM,
    dst: QemuVM,
    config: MigrationConfig,
    auto_converge: bool,
    res: QemuMigrationResult,
) -> None:
    caps = [{"capability": "events", "state": True}]
    if auto_converge:
        caps.append({"capability": "auto-converge", "state": True})
    params: dict[str, Any] = {}
    if config.max_bandwidth is not None:
        params["max-bandwidth"] = config.max_bandwidth
    if config.multifd_channels:
        for vm in (src, dst):
            await vm.cmd(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "multifd", "state": True}]},
            )
            await vm.cmd("migrate-set-parameters", {"multifd-channels": config.multifd_channels})
    await src.cmd("migrate-set-capabilities", {"capabilities": caps})
    if params:
        await src.cmd("migrate-set-parameters", params)
    effective = await src.cmd("query-migrate-parameters")
    res.parameters = {
        k: effective.get(k)
        for k in ("max-bandwidth", "downtime-limit", "multifd-channels", "cpu-throttle-initial",
                  "cpu-throttle-increment", "max-cpu-throttle")
    }  # fmt: skip
    capabilities = await src.cmd("query-migrate-capabilities")
    res.parameters["capabilities"] = sorted(c["capability"] for c in capabilities if c["state"])


def _keep(work: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in work.iterdir():
        if f.suffix in (".serial", ".log"):
            shutil.copy(f, dest / f.name)


# -- checkpoint and restore -----------------------------------------------------------


async def checkpoint_restore(
    mem_mib: int,
    mode: str = "stopped",
    ws_mib: int | None = None,
    rate_mibs: int = 50,
    image: GuestImage | None = None,
    max_bandwidth: int = FAST_BANDWIDTH,
    timeout_s: float = 120,
    keep_dir: Path | None = None,
    kernel_args: str = "",
) -> QemuCheckpointResult:
    """Checkpoint a guest to a file with migrate exec:, restore it in a new QEMU."""
    if mode not in ("stopped", "running"):
        raise ValueError(f"mode must be 'stopped' or 'running', not {mode!r}")
    _require_qemu()
    image = _image(image)
    ws_mib = mem_mib // 4 if ws_mib is None else ws_mib
    res = QemuCheckpointResult(mem_mib, mode, ws_mib, rate_mibs, load_avg=os.getloadavg()[0])
    cmdline = kernel_cmdline(ws_mib * MIB, rate_mibs * MIB, extra=kernel_args)
    with tempfile.TemporaryDirectory(prefix="qemu-ckpt-") as tmp:
        work = Path(tmp)
        state = work / "checkpoint.qemu"
        src = QemuVM("src", work, image, mem_mib, cmdline)
        dst = QemuVM(
            "restore", work, image, mem_mib, cmdline,
            incoming=f"exec:cat {shlex.quote(str(state))}",
        )  # fmt: skip
        try:
            await src.start()
            res.qemu_version = await src.version()
            await src.cmd(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "events", "state": True}]},
            )
            await src.cmd("migrate-set-parameters", {"max-bandwidth": max_bandwidth})
            await src.wait_console(
                lambda r: len(r.heartbeats) >= 2, BOOT_TIMEOUT_S, "two heartbeats"
            )

            t0 = time.monotonic()
            if mode == "stopped":
                await src.cmd("stop")
            await src.cmd("migrate", {"uri": f"exec:cat > {shlex.quote(str(state))}"})
            info, timed_out = await _poll_migration(src, timeout_s)
            res.checkpoint_ms = (time.monotonic() - t0) * 1e3
            if timed_out or info.get("status") != "completed":
                status = f"{info.get('status')} {info.get('error-desc', '')}".strip()
                raise QemuPeerError(f"checkpoint did not complete: {status}")
            saved = src.console()  # what the guest had said when its state was saved
            last_src = saved.heartbeats[-1].n if saved.heartbeats else None
            await _cont(src)  # a checkpoint leaves the guest running
            info = await _final_info(src, info)
            res.qemu_total_time_ms = info.get("total-time")
            res.downtime_ms = info.get("downtime")
            stops, resumes = src.events("STOP"), src.events("RESUME")
            if stops and resumes:
                res.pause_ms = (_event_time(resumes[-1]) - _event_time(stops[-1])) * 1e3
            res.file_bytes = state.stat().st_size
            await src.close()

            await dst.start()
            try:
                running = await dst.wait_running(timeout_s, resume_paused=mode == "stopped")
                res.restore_ms = (running - dst.started) * 1e3
            except QemuPeerError as exc:  # maybe the guest crashed at once: look below
                res.error = str(exc)
            with contextlib.suppress(QemuPeerError):  # a crashed guest is checked below
                await dst.wait_console(
                    lambda r: bool(r.heartbeats or r.crashes), timeout_s, "heartbeat"
                )
            if dst.console().heartbeats:
                res.restore_to_heartbeat_ms = (time.monotonic() - dst.started) * 1e3
            await _check_guest(dst, res.guest, last_src)
            res.status = "completed" if res.restore_ms is not None else "error"
        except QemuPeerError as exc:
            res.status, res.error = "error", str(exc)
        finally:
            await asyncio.gather(src.close(), dst.close())
            if keep_dir is not None:
                _keep(work, keep_dir / f"checkpoint-{mem_mib}-{mode}")
    return res


# -- synchronous entry points ------------------------------------------------------------


def run_live_migration(
    scenario: Scenario | str,
    config: MigrationConfig | str = "default",
    image: GuestImage | None = None,
    keep_dir: Path | None = None,
) -> QemuMigrationResult:
    """One QEMU live migration on loopback (not callable from inside an event loop)."""
    s = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    c = CONFIGS[config] if isinstance(config, str) else config
    return asyncio.run(live_migration(s, c, image, keep_dir))


def run_checkpoint_restore(
    mem_mib: int,
    mode: str = "stopped",
    image: GuestImage | None = None,
    keep_dir: Path | None = None,
    **kwargs: Any,
) -> QemuCheckpointResult:
    """One checkpoint to a file and restore (not callable from inside an event loop)."""
    return asyncio.run(checkpoint_restore(mem_mib, mode, image=image, keep_dir=keep_dir, **kwargs))


# -- the table ------------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _guest_cell(g: GuestCheck) -> str:
    if g.ok is None:
        return "-"
    if g.ok:
        return f"ok ({g.heartbeats} HB)"
    if g.crashes:
        return f"CRASHED errors={g.errors}"
    if g.errors:
        return f"CORRUPT errors={g.errors}"
    return f"BAD: {g.note}"[:40]


def live_table(results: list[QemuMigrationResult]) -> str:
    head = (
        "scenario", "config", "status", "total ms", "down ms", "pause ms", "setup ms",
        "xfer MiB", "Mbit/s", "syncs", "thr %", "guest MiB/s", "guest after",
    )  # fmt: skip
    rows = [head]
    for r in results:
        rows.append((
            r.scenario, r.config, r.status, _fmt(r.total_time_ms), _fmt(r.downtime_ms),
            _fmt(r.pause_ms), _fmt(r.setup_time_ms),
            _fmt(r.transferred_bytes / MIB if r.transferred_bytes is not None else None),
            _fmt(r.mbps), _fmt(r.dirty_sync_count), str(r.max_throttle_pct or "-"),
            f"{_fmt(r.guest_rate_before_mibs)}/{_fmt(r.guest_rate_during_mibs)}",
            _guest_cell(r.guest),
        ))  # fmt: skip
    return _render(rows)


def checkpoint_table(results: list[QemuCheckpointResult]) -> str:
    head = (
        "guest", "mode", "status", "file MiB", "ckpt ms", "qemu ms", "down ms", "pause ms",
        "restore ms", "to HB ms", "guest after",
    )  # fmt: skip
    rows = [head]
    for r in results:
        rows.append((
            f"{r.mem_mib} MiB (ws {r.ws_mib}@{r.rate_mibs})", r.mode, r.status,
            _fmt(r.file_bytes / MIB if r.file_bytes is not None else None, 1),
            _fmt(r.checkpoint_ms), _fmt(r.qemu_total_time_ms), _fmt(r.downtime_ms),
            _fmt(r.pause_ms), _fmt(r.restore_ms), _fmt(r.restore_to_heartbeat_ms),
            _guest_cell(r.guest),
        ))  # fmt: skip
    return _render(rows)


def _render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario", action="append", choices=[*SCENARIOS, "all", "none"],
        help="live-migration scenario (repeatable; default all)",
    )  # fmt: skip
    parser.add_argument(
        "--config", action="append", choices=[*CONFIGS, "all"],
        help="migration configuration (repeatable; default: default and fast)",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint", action="append", type=int, metavar="MIB",
        help="checkpoint/restore a guest of this size (repeatable; default 256 and 1024)",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint-mode", action="append", choices=["stopped", "running"],
        help="checkpoint a stopped or a running guest (default: both)",
    )  # fmt: skip
    parser.add_argument("--no-checkpoint", action="store_true", help="skip checkpoint/restore")
    parser.add_argument(
        "--no-auto-converge", action="store_true", help="never enable auto-converge"
    )
    parser.add_argument("--kernel-args", default="", help="extra guest kernel parameters")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each combination")
    parser.add_argument("--json", type=Path, help="also write all results as JSON here")
    parser.add_argument("--keep-logs", type=Path, help="copy the serial and QEMU logs here")
    parser.add_argument("--image-dir", type=Path, help="guest image directory")
    args = parser.parse_args(argv)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # EOF on quit is expected

    scenarios = args.scenario or ["all"]
    scenarios = [] if "none" in scenarios else list(SCENARIOS) if "all" in scenarios else scenarios
    configs = args.config or ["default", "fast"]
    configs = list(CONFIGS) if "all" in configs else configs

    signal.signal(signal.SIGTERM, _interrupt)  # clean up on SIGTERM as on Ctrl-C
    try:
        _require_qemu()
        image = build_image(args.image_dir or default_image_dir(), lambda m: print(f"image: {m}"))
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"# guest {image.kernel_version}, {QEMU}, TCG, 1 vCPU, {os.cpu_count()} host cores")

    live: list[QemuMigrationResult] = []
    ckpt: list[QemuCheckpointResult] = []
    interrupted = False
    try:
        for name in scenarios:
            for cname in configs:
                config = CONFIGS[cname]
                if args.no_auto_converge:
                    config = replace(config, auto_converge=False)
                for _ in range(args.repeat):
                    scenario = replace(SCENARIOS[name], kernel_args=args.kernel_args)
                    r = run_live_migration(scenario, config, image, args.keep_logs)
                    live.append(r)
                    print(f"{name}/{cname}: {r.status} total={r.total_time_ms} ms "
                          f"downtime={r.downtime_ms} ms guest={_guest_cell(r.guest)}"
                          + (f" error={r.error}" if r.error else ""), flush=True)  # fmt: skip
        if not args.no_checkpoint:
            for mem in args.checkpoint or [256, 1024]:
                for mode in args.checkpoint_mode or ["stopped", "running"]:
                    for _ in range(args.repeat):
                        c = run_checkpoint_restore(
                            mem, mode, image, args.keep_logs, kernel_args=args.kernel_args
                        )
                        ckpt.append(c)
                        print(f"checkpoint {mem} MiB {mode}: {c.status} file={c.file_bytes} "
                              f"ckpt={_fmt(c.checkpoint_ms)} ms restore={_fmt(c.restore_ms)} ms"
                              + (f" error={c.error}" if c.error else ""), flush=True)  # fmt: skip
    except KeyboardInterrupt:
        print("interrupted; QEMU processes stopped", file=sys.stderr)
        interrupted = True
    finally:
        _kill_leftovers()

    if live:
        print("\n" + live_table(live))
    if ckpt:
        print("\n" + checkpoint_table(ckpt))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"live": [asdict(r) for r in live], "checkpoint": [asdict(c) for c in ckpt]},
                indent=2,
            )
        )
    failed = [r for r in live if r.status == "error"] + [c for c in ckpt if c.status == "error"]
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
