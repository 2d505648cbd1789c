"""The guests of one node agent: a VMM process each, in STATE_DIR/vms/NAME.

VMM processes outlive the agent (each in its own session), so an agent that
restarts (a crash, an upgrade) finds its guests again by scanning its state
directory and re-attaching to every VMM that still answers.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from vmigrate.proto import state_pb2 as pb
from vmigrate.proto import vmm_pb2
from vmigrate.vmm.client import VmmClient, VmmError, kill_vmm, pid_alive, read_pid, spawn_vmm
from vmigrate.vmm.server import CONFIG_NAME, CONSOLE_NAME

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# A same-host upgrade (migrate/upgrade.py) starts the guest's new VMM in
# vms/.upgrade-ID-NAME and renames it to vms/NAME once the old VMM is gone; an
# agent that restarts settles such a directory before adopting guests.
UPGRADE_PREFIX = ".upgrade-"

STATE_NAMES = {
    vmm_pb2.VmmStatus.CREATED: "created",
    vmm_pb2.VmmStatus.RUNNING: "running",
    vmm_pb2.VmmStatus.PAUSED: "paused",
    vmm_pb2.VmmStatus.STOPPED: "stopped",
    vmm_pb2.VmmStatus.CRASHED: "crashed",
}


class VmExists(Exception):
    pass


class NoSuchVm(Exception):
    pass


class VmBusy(Exception):
    pass


def check_vm_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ValueError(f"invalid VM name {name!r}: use 1-63 lowercase letters, digits, "
                         "'-', '_' or '.', starting with a letter or digit")
    return name


@dataclass
class LocalVm:
    name: str
    dir: Path
    client: VmmClient
    pid: int
    config: pb.VmConfig
    proc: subprocess.Popen | None = None
    # One long operation (send, checkpoint, upgrade) at a time per guest.
    op_lock: threading.Lock = field(default_factory=threading.Lock)
    operation: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    incoming_migration: str = ""   # set while this is the destination of a migration

    def status(self) -> vmm_pb2.VmmStatus:
        return self.client.status(timeout=5)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return pid_alive(self.pid)

    def begin(self, operation: str) -> None:
        if not self.op_lock.acquire(blocking=False):
            raise VmBusy(f"{self.name} is busy: {self.operation} in progress")
        self.operation = operation
        self.cancel.clear()

    def end(self) -> None:
        self.operation = ""
        self.op_lock.release()


class Standby:
    """VMM processes started ahead of need (imports done, KVM checked), so a
    new guest or an incoming migration gets its VMM in milliseconds."""

    PREFIX = ".standby-"

    def __init__(self, root: Path, count: int) -> None:
        self.root = root
        self.count = count
        self._ready: list[tuple[subprocess.Popen, Path]] = []
        self._lock = threading.Lock()
        self._starting = 0
        self._closed = False

    def refill(self) -> None:
        with self._lock:
            missing = self.count - len(self._ready) - self._starting
            if missing <= 0 or self._closed:
                return
            self._starting += missing
        for _ in range(missing):
            threading.Thread(target=self._start_one, name="standby", daemon=True).start()

    def _start_one(self) -> None:
        import uuid

        vm_dir = self.root / f"{self.PREFIX}{uuid.uuid4().hex[:8]}"
        try:
            vm_dir.mkdir(mode=0o700)
            proc, client = spawn_vmm(vm_dir, None)
            client.close()
        except (VmmError, OSError):
            shutil.rmtree(vm_dir, ignore_errors=True)
            with self._lock:
                self._starting -= 1
            return
        with self._lock:
            self._starting -= 1
            if self._closed:
                kill_vmm(proc.pid)
                shutil.rmtree(vm_dir, ignore_errors=True)
                return
            self._ready.append((proc, vm_dir))

    def take(self) -> tuple[subprocess.Popen, Path] | None:
        with self._lock:
            while self._ready:
                proc, vm_dir = self._ready.pop(0)
                if proc.poll() is None:
                    return proc, vm_dir
                shutil.rmtree(vm_dir, ignore_errors=True)
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
        for proc, vm_dir in ready:
            kill_vmm(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            shutil.rmtree(vm_dir, ignore_errors=True)


class VmRegistry:
    def __init__(self, state_dir: Path, standby: int = 1) -> None:
        self.root = state_dir / "vms"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._vms: dict[str, LocalVm] = {}
        self._lock = threading.Lock()
        self.standby = Standby(self.root, standby)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._vms

    def get(self, name: str) -> LocalVm:
        with self._lock:
            vm = self._vms.get(name)
        if vm is None:
            raise NoSuchVm(f"no VM named {name!r} on this host")
        return vm

    def all(self) -> list[LocalVm]:
        with self._lock:
            return sorted(self._vms.values(), key=lambda v: v.name)

    def spawn(self, config: pb.VmConfig, memory_file: str | None = None,
              dir_name: str | None = None, console_seed: bytes = b"") -> LocalVm:
        """Start a VMM for `config` (not booted yet). `console_seed` is console
        history that came with the guest (a checkpoint, a migration)."""
        name = check_vm_name(config.name)
        vm_dir = self.root / (dir_name or name)
        with self._lock:
            if name in self._vms and not dir_name:
                raise VmExists(f"a VM named {name!r} already runs on this host")
            if vm_dir.exists():
                pid = read_pid(vm_dir)
                if pid and pid_alive(pid):
                    raise VmExists(f"a VMM for {name!r} is already running (pid {pid})")
                shutil.rmtree(vm_dir, ignore_errors=True)    # left over from a crash
            vm_dir.mkdir(parents=True, mode=0o700)
        if console_seed:
            (vm_dir / CONSOLE_NAME).write_bytes(console_seed)
        try:
            proc, client = self._from_standby(vm_dir, config, memory_file) or \
                spawn_vmm(vm_dir, config, memory_file=memory_file)
        except VmmError:
            shutil.rmtree(vm_dir, ignore_errors=True)
            raise
        finally:
            self.standby.refill()
        vm = LocalVm(name=name, dir=vm_dir, client=client, pid=proc.pid, config=config, proc=proc)
        if not dir_name:
            self.add(vm)
        return vm

    def _from_standby(self, vm_dir: Path, config: pb.VmConfig,
                      memory_file: str | None) -> tuple[subprocess.Popen, VmmClient] | None:
        got = self.standby.take()
        if got is None:
            return None
        proc, standby_dir = got
        # The standby's files (its socket among them) move into the guest's directory.
        for f in standby_dir.iterdir():
            f.rename(vm_dir / f.name)
        standby_dir.rmdir()
        client = VmmClient(vm_dir)
        try:
            client.create(config, vm_dir, memory_file or "")
        except VmmError:
            client.close()
            kill_vmm(proc.pid)
            raise
        return proc, client

    def add(self, vm: LocalVm) -> None:
        with self._lock:
            self._vms[vm.name] = vm

    def replace(self, vm: LocalVm) -> None:
        with self._lock:
            self._vms[vm.name] = vm

    def forget(self, name: str) -> LocalVm | None:
        with self._lock:
            return self._vms.pop(name, None)

    def destroy(self, vm: LocalVm, reason: str = "stopped") -> None:
        """Shut the VMM down, make sure its process is gone, remove its directory."""
        vm.client.shutdown(reason)
        vm.client.close()
        if vm.proc is not None:
            try:
                vm.proc.wait(5)
            except subprocess.TimeoutExpired:
                kill_vmm(vm.pid)
                vm.proc.wait(5)
        elif pid_alive(vm.pid):
            kill_vmm(vm.pid)
        shutil.rmtree(vm.dir, ignore_errors=True)
        with self._lock:
            if self._vms.get(vm.name) is vm:
                del self._vms[vm.name]

    def adopt_existing(self) -> tuple[list[LocalVm], list[str]]:
        """Re-attach to VMMs left running by a previous agent; clean dead ones."""
        adopted, removed = [], []
        for vm_dir in sorted(self.root.iterdir()):
            if not vm_dir.is_dir():
                continue
            if vm_dir.name.startswith(Standby.PREFIX):   # a previous agent's spare
                pid = read_pid(vm_dir)
                if pid and pid_alive(pid):
                    kill_vmm(pid)
                shutil.rmtree(vm_dir, ignore_errors=True)
                continue
            if vm_dir.name.startswith(UPGRADE_PREFIX):
                # An upgrade the agent could not settle (upgrade.settle_interrupted
                # logged why): never adopt a second VMM for the same guest.
                continue
            pid = read_pid(vm_dir)
            if pid is None or not pid_alive(pid):
                shutil.rmtree(vm_dir, ignore_errors=True)
                removed.append(vm_dir.name)
                continue
            client = VmmClient(vm_dir)
            try:
                status = client.status(timeout=5)
                config = pb.VmConfig.FromString((vm_dir / CONFIG_NAME).read_bytes())
            except (VmmError, OSError, ValueError):
                client.close()
                kill_vmm(pid)
                shutil.rmtree(vm_dir, ignore_errors=True)
                removed.append(vm_dir.name)
                continue
            vm = LocalVm(name=config.name, dir=vm_dir, client=client, pid=pid,
                         config=status.config if status.config.name else config)
            vm.incoming_migration = status.migration_id if status.awaiting_commit else ""
            self.add(vm)
            adopted.append(vm)
        return adopted, removed

    def close(self) -> None:
        self.standby.close()
        for vm in self.all():
            with contextlib.suppress(Exception):
                vm.client.close()
