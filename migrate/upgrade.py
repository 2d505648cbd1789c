"""Same-host live update: `vmigrate upgrade NAME` moves a running guest into a
fresh VMM process on the same host (after vmigrate itself was upgraded, or to
shed a VMM that grew) without copying its memory.

Guest memory is a memfd (vmm/memory.py). The new VMM maps the old one's memfd
through /proc/<old pid>/fd/<n> (`--memory-file`, or the Create call of a
standby VMM), so only the vCPU and device state -- kilobytes -- travels:

    spawn the new VMM on the same memfd (vms/.upgrade-ID-NAME), check the inode
    -> pause + save the old one (one call) -> restore into the new one
    -> resume the new one                         <- the point of no return
    -> the registry points at the new VMM -> the old VMM exits
    -> vms/.upgrade-ID-NAME becomes vms/NAME

ID is new for every upgrade: a VMM remembers the directory it was created in
and removes its socket and pid file there when it exits, so a temporary name
must never be given to another VMM later.

Until the new VMM has run, any failure (or a cancel) discards the new VMM and
resumes the old one. Once the new one has run, the old one must never run
again: both map the same memory, and the old vCPU state is stale. The memfd
outlives the old VMM because the new one holds it open and mapped (the kernel
frees a memfd's pages when its last reference goes); the new VMM's status is
checked after the old one exited.

The cluster store is not touched: the guest never leaves the host, its owner
stays the same.

If the agent dies half-way, the VMM processes live on. On restart
:func:`settle_interrupted` looks at the new VMM: still CREATED (never resumed)
-> it is discarded and the old one resumes if it was paused for the upgrade;
anything else -> it has run, so the old VMM is stopped and the new one takes
the guest's directory. The VMM's own state decides, so there is no window
between a marker and the resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from vmigrate.migrate import progress
from vmigrate.migrate.errors import AgentError, Cancelled
from vmigrate.migrate.progress import Stopwatch
from vmigrate.migrate.vms import UPGRADE_PREFIX, LocalVm
from vmigrate.proto import agent_pb2, vmm_pb2
from vmigrate.vmm.client import VmmClient, VmmError, kill_vmm, pid_alive, read_pid

if TYPE_CHECKING:
    from vmigrate.migrate.agent import Agent

log = logging.getLogger("vmigrate.upgrade")

PAUSE_REASON = "upgrade"          # kept in the old VMM's status while it waits
CONSOLE_TAIL = 64 << 10           # console history handed to the new VMM (as a migration)
S = vmm_pb2.VmmStatus


class Undecided(AgentError):
    """The new VMM's resume failed and its state cannot be read: it may have run."""


def upgrade_vm(agent: Agent, request: agent_pb2.VmRef,
               context: grpc.ServicerContext) -> Iterator[agent_pb2.Progress]:
    vm = agent.vms.get(request.name)
    if vm.incoming_migration:
        raise AgentError(f"{vm.name} is still arriving here", grpc.StatusCode.ABORTED)
    vm.begin("upgrade")
    try:
        yield from progress.relay(lambda emit: InPlaceUpgrade(agent, vm, emit).run(),
                                  vm.cancel, f"upgrade-{vm.name}")
    finally:
        vm.end()


def _inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _state_of(client: VmmClient) -> int | None:
    """The VMM's state, or None when it does not answer (twice)."""
    for _ in range(2):
        try:
            return client.status(timeout=5).state
        except VmmError:
            time.sleep(0.2)
    return None


class InPlaceUpgrade:
    def __init__(self, agent: Agent, vm: LocalVm, emit: progress.Emit) -> None:
        self.agent = agent
        self.old = vm
        self.emit = emit
        self.new: LocalVm | None = None
        self.paused = False            # the old VMM was paused by us
        self.was_paused = False        # ... or was already paused by the user
        self.ran = False               # the new VMM has run: no way back
        self.report = agent_pb2.MigrationReport(
            migration_id=f"upgrade-{uuid.uuid4().hex[:12]}", vm=vm.name, source=agent.name,
            destination=agent.name, compression="none: memory handed over (memfd)",
            streams=0)

    def run(self) -> agent_pb2.Progress:
        old = self.old
        t0 = time.monotonic()
        try:
            status = old.status()
            if status.state not in (S.RUNNING, S.PAUSED):
                state = {S.CREATED: "created", S.STOPPED: "stopped",
                         S.CRASHED: "crashed"}.get(status.state, "not running")
                raise AgentError(f"{old.name} is {state}; only running or paused guests "
                                 "can be upgraded")
            self.was_paused = status.state == S.PAUSED
            info = old.client.memory()
            memfd = _inode(info.path)
            self.emit(agent_pb2.Progress(phase="prepare",
                                         message="starting a new VMM on the same memory"))
            self.new = self.agent.vms.spawn(
                old.config, memory_file=info.path,
                dir_name=f"{UPGRADE_PREFIX}{uuid.uuid4().hex[:8]}-{old.name}")
            new_info = self.new.client.memory()
            if _inode(new_info.path) != memfd or new_info.size != info.size:
                raise AgentError("the new VMM did not map the guest's memory file")
            self.report.setup_ms = (time.monotonic() - t0) * 1000
            if old.cancel.is_set():
                raise Cancelled(f"upgrade of {old.name} cancelled; it keeps running in its "
                                "VMM")
            self._switch()
        except BaseException as e:
            if self.ran:               # past the point of no return: finish the swap
                with contextlib.suppress(Exception):
                    self._retire_old()
                raise
            self._roll_back(e)
            if isinstance(e, Cancelled | Undecided):
                raise
            if isinstance(e, AgentError | VmmError | OSError | ValueError):
                where = ("the guest stays paused in its old VMM" if self.was_paused
                         else "the guest keeps running in its old VMM")
                raise AgentError(f"upgrade of {old.name} failed: {e}; {where}") from None
            raise
        self._retire_old()
        self.report.total_ms = (time.monotonic() - t0) * 1000
        self.report.outcome = "completed"
        self.report.guest_bytes = info.size
        assert self.new is not None
        self.report.detail = (f"memory handed over, not copied: {info.size >> 20} MiB memfd "
                              f"(inode {memfd[1]}); VMM pid {old.pid} -> {self.new.pid}; "
                              + self.report.detail)
        return agent_pb2.Progress(phase="done", migration=self.report)

    def _switch(self) -> None:
        """The downtime: pause + save the old VMM, restore and run the new one."""
        old, new = self.old, self.new
        assert new is not None
        self.emit(agent_pb2.Progress(phase="switchover", message="pausing the old VMM"))
        pre_console, console_end = old.client.console_tail(CONSOLE_TAIL)
        paused_at = time.monotonic()
        step = Stopwatch(self.report.downtime_steps)
        # Set first: the call may pause and then fail to save (resuming a
        # running VM is harmless, leaving a paused one paused is not).
        self.paused = not self.was_paused
        # Nothing is copied, so no dirty log.
        reply = old.client.pause_and_save(PAUSE_REASON, console_end, dirty_log=False)
        self.report.pause_ms = reply.pause_ms
        step("pause_and_save")
        history = (pre_console + reply.console)[-CONSOLE_TAIL:]
        new.client.restore(reply.state, console_history=history)
        step("restore")
        self._start_new()
        step("resume")
        self.report.downtime_ms = (time.monotonic() - paused_at) * 1000
        self.report.switchover_ms = self.report.downtime_ms - self.report.pause_ms
        self.report.state_version = reply.state.state_version
        state_bytes = reply.state.ByteSize()
        self.report.bytes_on_wire = state_bytes + len(history)
        self.report.detail = (f"copied: state {state_bytes} B + console {len(history)} B")

    def _start_new(self) -> None:
        """Run the new VMM (or make it an ordinary paused VM). Sets `ran` as
        soon as it may have run; raises only if it certainly has not."""
        new = self.new
        assert new is not None
        try:
            if self.was_paused:
                new.client.resume_paused()
            else:
                new.client.resume()
            self.ran = True
            return
        except VmmError as e:
            err = e
        state = _state_of(new.client)
        if state == S.CREATED:
            raise err                  # never ran: the old VMM takes over again
        self.ran = state is not None
        if state is None:
            raise Undecided(f"upgrade of {self.old.name}: the new VMM failed to start ({err}) "
                            "and does not answer, so it may have run; it was killed and the "
                            f"guest is left paused in its old VMM (pid {self.old.pid}): check "
                            f"'vmigrate logs {self.old.name}' before resuming it")
        log.warning("upgrade of %s: resume reported %s but the new VMM has run", new.name, err)

    def _roll_back(self, e: BaseException) -> None:
        """Before the new VMM ran: discard it, the old one goes on."""
        log.info("upgrade of %s abandoned: %s", self.old.name, e)
        if self.new is not None:
            with contextlib.suppress(Exception):
                self.agent.vms.destroy(self.new, "upgrade abandoned")
            if pid_alive(self.new.pid):        # destroy gave up: never resume beside it
                kill_vmm(self.new.pid)
        if self.paused and not isinstance(e, Undecided):
            with contextlib.suppress(VmmError):
                self.old.client.resume()

    def _retire_old(self) -> None:
        """After the new VMM ran: it becomes the guest's VMM, the old one goes."""
        old, new = self.old, self.new
        assert new is not None
        new.begin("upgrade")           # until its directory and client are final
        try:
            self.agent.vms.replace(new)
            # The old VMM exits; its memfd lives on in the new one.
            self.agent.vms.destroy(old, "upgraded: the guest moved to a new VMM")
            state = _state_of(new.client)
            if state not in (S.RUNNING, S.PAUSED):
                log.error("upgrade of %s: after the old VMM exited the new one is %s",
                          new.name, state)
                self.report.detail += f"; WARNING: new VMM state {state} after the old exited"
            final = old.dir
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(new.dir, final)
            except OSError as e:       # it runs fine from there; a restart renames it
                log.error("upgrade of %s: cannot rename %s: %s", new.name, new.dir, e)
                return
            temp_client, new.client, new.dir = new.client, VmmClient(final), final
            temp_client.close()
        finally:
            new.end()
        self.agent._update_info()


# ---------------------------------------------------------------- agent restart


def settle_interrupted(root: Path) -> list[str]:
    """Finish or undo the upgrades a previous agent left half-done; returns
    one line per guest. Runs before the agent adopts its guests."""
    notes = []
    for new_dir in sorted(root.glob(f"{UPGRADE_PREFIX}*")):
        name = new_dir.name[len(UPGRADE_PREFIX):].split("-", 1)[-1]    # .upgrade-ID-NAME
        try:
            notes.append(_settle_one(new_dir, root / name, name))
        except (VmmError, OSError) as e:
            log.error("cannot settle the interrupted upgrade of %s: %s (left in %s)",
                      name, e, new_dir)
    return notes


def _settle_one(new_dir: Path, old_dir: Path, name: str) -> str:
    new_pid = read_pid(new_dir)
    new_alive = bool(new_pid and pid_alive(new_pid))
    state = None
    if new_alive:
        client = VmmClient(new_dir)
        try:
            state = _state_of(client)
        finally:
            client.close()
    old_waiting = _paused_for_upgrade(old_dir)
    if state in (S.CREATED, S.STANDBY) or (not new_alive and not old_waiting):
        # Never resumed (or never got that far): the old VMM keeps the guest.
        if new_alive:
            kill_vmm(new_pid)  # type: ignore[arg-type]
        shutil.rmtree(new_dir, ignore_errors=True)
        if old_waiting:
            client = VmmClient(old_dir)
            try:
                client.resume()
            finally:
                client.close()
            return f"{name}: interrupted upgrade undone, the guest resumed in its old VMM"
        return f"{name}: interrupted upgrade undone, the guest stays in its old VMM"
    if state is None:
        # The new VMM is mute, or gone while the old one waits: it may have run
        # on the shared memory, so the old one must not resume blindly.
        if new_alive:
            kill_vmm(new_pid)  # type: ignore[arg-type]
        shutil.rmtree(new_dir, ignore_errors=True)
        log.error("%s: the new VMM of an interrupted upgrade is gone and may have run; the "
                  "guest is left paused in its old VMM: check its console before resuming",
                  name)
        return f"{name}: interrupted upgrade, guest left paused (see the error above)"
    # It ran: it owns the guest. The old VMM (paused, stale) goes.
    old_pid = read_pid(old_dir)
    if old_pid and pid_alive(old_pid):
        client = VmmClient(old_dir)
        client.shutdown("upgraded: the guest moved to a new VMM")
        client.close()
        kill_vmm(old_pid)
    shutil.rmtree(old_dir, ignore_errors=True)
    os.rename(new_dir, old_dir)
    return f"{name}: interrupted upgrade completed, the guest runs in its new VMM"


def _paused_for_upgrade(vm_dir: Path) -> bool:
    pid = read_pid(vm_dir)
    if not pid or not pid_alive(pid):
        return False
    client = VmmClient(vm_dir)
    try:
        st = client.status(timeout=5)
    except VmmError:
        return False
    finally:
        client.close()
    return st.state == S.PAUSED and st.pause_reason == PAUSE_REASON
