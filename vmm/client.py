"""Starting VMM processes and talking to them (used by the node agent)."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from vmigrate.proto import state_pb2 as pb
from vmigrate.proto import vmm_pb2, vmm_pb2_grpc
from vmigrate.vmm.server import CONFIG_NAME, PID_NAME, SOCKET_NAME

CALL_TIMEOUT_S = 30.0
START_TIMEOUT_S = 30.0
STDERR_NAME = "vmm.err"
MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None, use_errno=True)


class VmmError(Exception):
    """A VMM could not be started or refused a request; one line for the user."""


def _one_line(e: grpc.RpcError, what: str) -> VmmError:
    code = e.code() if hasattr(e, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return VmmError(f"{what}: the VMM process is not running")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return VmmError(f"{what}: the VMM did not answer in time")
    details = e.details() if hasattr(e, "details") else str(e)
    return VmmError(f"{what}: {details}")


class VmmClient:
    def __init__(self, vm_dir: Path) -> None:
        self.dir = vm_dir
        self.channel = grpc.insecure_channel(
            f"unix:{vm_dir / SOCKET_NAME}",
            options=[("grpc.max_receive_message_length", 64 << 20),
                     ("grpc.max_send_message_length", 64 << 20)])
        self.stub = vmm_pb2_grpc.VmmStub(self.channel)

    def _call(self, what: str, method: str, request: object,
              timeout: float = CALL_TIMEOUT_S) -> object:
        try:
            return getattr(self.stub, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            raise _one_line(e, what) from None

    def create(self, config: pb.VmConfig, vm_dir: Path, memory_file: str = "") -> None:
        self._call("create", "Create", vmm_pb2.CreateRequest(
            config=config, dir=str(vm_dir), memory_file=memory_file))

    def status(self, timeout: float = CALL_TIMEOUT_S) -> vmm_pb2.VmmStatus:
        return self._call("status", "Status", vmm_pb2.Empty(), timeout)

    def boot(self) -> vmm_pb2.VmmStatus:
        return self._call("boot", "Boot", vmm_pb2.Empty())

    def restore(self, state: pb.VmState, migration_id: str = "",
                console_history: bytes = b"") -> vmm_pb2.VmmStatus:
        return self._call("restore", "Restore", vmm_pb2.RestoreRequest(
            state=state, migration_id=migration_id, console_history=console_history))

    def map_lazy(self, path: str, image_offset: int, page_index: bytes) -> None:
        self._call("lazy restore", "MapLazy", vmm_pb2.LazyRequest(
            path=path, image_offset=image_offset, page_index=page_index))

    def pause(self, reason: str = "user") -> float:
        return self._call("pause", "Pause", vmm_pb2.PauseRequest(reason=reason)).pause_ms

    def pause_and_save(self, reason: str, console_from: int | None = None,
                       dirty_log: bool = True) -> vmm_pb2.PauseReply:
        """Pause, fetch the dirty log (unless dirty_log is False: it must be on)
        and save the state in one call (the downtime path); with console_from,
        also the console output since then."""
        return self._call("pause", "Pause", vmm_pb2.PauseRequest(
            reason=reason, fetch_dirty_log=dirty_log, save=True,
            console=console_from is not None, console_from=console_from or 0))

    def resume(self) -> vmm_pb2.VmmStatus:
        return self._call("resume", "Resume", vmm_pb2.ResumeRequest())

    def resume_paused(self) -> vmm_pb2.VmmStatus:
        """Make a restored guest an ordinary paused VM without running it."""
        return self._call("resume", "Resume", vmm_pb2.ResumeRequest(keep_paused=True))

    def save(self) -> pb.VmState:
        return self._call("save", "Save", vmm_pb2.Empty())

    def memory(self) -> vmm_pb2.MemoryInfo:
        return self._call("memory", "Memory", vmm_pb2.Empty())

    def dirty_log(self, op: int) -> vmm_pb2.DirtyLogReply:
        return self._call("dirty log", "DirtyLog", vmm_pb2.DirtyLogRequest(op=op))

    def start_dirty_log(self) -> None:
        self.dirty_log(vmm_pb2.DirtyLogRequest.START)

    def fetch_dirty_log(self) -> np.ndarray:
        """Pages dirtied since the last fetch: a uint64 bitmap over the memory file."""
        reply = self.dirty_log(vmm_pb2.DirtyLogRequest.FETCH)
        return np.frombuffer(reply.bitmap, dtype=np.uint64)

    def stop_dirty_log(self) -> None:
        self.dirty_log(vmm_pb2.DirtyLogRequest.STOP)

    def set_throttle(self, percent: int) -> None:
        self._call("throttle", "SetThrottle", vmm_pb2.ThrottleRequest(percent=percent))

    def console_read(self, follow: bool = False, tail_bytes: int = 0,
                     timeout: float | None = None, only_new: bool = False) -> Iterator[bytes]:
        for data, _ in self.console_chunks(follow, tail_bytes, timeout, only_new):
            yield data

    def console_tail(self, tail_bytes: int) -> tuple[bytes, int]:
        """The last `tail_bytes` of console output and the offset it ends at."""
        data, end = b"", 0
        for chunk, chunk_end in self.console_chunks(False, tail_bytes, 10):
            data += chunk
            end = chunk_end
        return data, end

    def console_chunks(self, follow: bool = False, tail_bytes: int = 0,
                       timeout: float | None = None,
                       only_new: bool = False) -> Iterator[tuple[bytes, int]]:
        try:
            for chunk in self.stub.ConsoleRead(
                    vmm_pb2.ConsoleReadRequest(follow=follow, tail_bytes=tail_bytes,
                                               only_new=only_new), timeout=timeout):
                yield chunk.data, chunk.end_offset
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                return
            raise _one_line(e, "console") from None

    def console_write(self, data: bytes) -> None:
        self._call("console", "ConsoleWrite", vmm_pb2.ConsoleData(data=data))

    def shutdown(self, reason: str = "stopped") -> None:
        with contextlib.suppress(VmmError):
            self._call("shutdown", "Shutdown", vmm_pb2.ShutdownRequest(reason=reason), 10)

    def close(self) -> None:
        self.channel.close()


def read_pid(vm_dir: Path) -> int | None:
    try:
        return int((vm_dir / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def spawn_vmm(vm_dir: Path, config: pb.VmConfig | None, memory_file: str | None = None,
              timeout: float = START_TIMEOUT_S) -> tuple[subprocess.Popen, VmmClient]:
    """Start a VMM process for `config` in `vm_dir` and wait until it answers
    (config None: a standby VMM, waiting for a Create call)."""
    vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = [sys.executable, "-P", "-m", "vmigrate.vmm", "--dir", str(vm_dir)]
    if config is None:
        argv.append("--standby")
    else:
        (vm_dir / CONFIG_NAME).write_bytes(config.SerializeToString())
    if memory_file:
        argv += ["--memory-file", memory_file]
    err_path = vm_dir / STDERR_NAME
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True, close_fds=True, cwd="/")
    client = VmmClient(vm_dir)
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            client.close()
            msg = _last_line(err_path) or f"exited with status {rc}"
            raise VmmError(msg.removeprefix("vmm: "))
        if (vm_dir / SOCKET_NAME).exists():
            try:
                client.status(timeout=2)
                return proc, client
            except VmmError:
                pass
        if time.monotonic() > deadline:
            kill_vmm(proc.pid)
            client.close()
            raise VmmError(f"the VMM did not start within {timeout:.0f} s")
        time.sleep(0.02)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def kill_vmm(pid: int, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class MappedMemory:
    """A VMM's guest memory, mapped into this process through its /proc path."""

    def __init__(self, info: vmm_pb2.MemoryInfo, writable: bool = False) -> None:
        self.size = info.size
        self.layout = info.layout
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            self.fd = os.open(info.path, flags | os.O_CLOEXEC)
        except OSError as e:
            raise VmmError(f"cannot open guest memory {info.path}: {e.strerror}") from None
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, prot)

    def populate_async(self, ranges: list[tuple[int, int]]) -> threading.Thread:
        """Pre-fault these byte ranges in a background thread (writing into
        never-touched memory is the receiver's biggest cost). The thread holds
        its own reference to the file, so close() may run meanwhile."""
        fd = os.dup(self.fd)
        size = self.size

        def run() -> None:
            try:
                m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError:
                os.close(fd)
                return
            base = ctypes.addressof(ctypes.c_char.from_buffer(m))
            try:
                for off, length in ranges:
                    if _libc.madvise(ctypes.c_void_p(base + off), ctypes.c_size_t(length),
                                     MADV_POPULATE_WRITE) != 0:
                        break           # kernel too old: the writes fault pages in anyway
            finally:
                base = 0
                with contextlib.suppress(BufferError):
                    m.close()
                os.close(fd)

        t = threading.Thread(target=run, name="populate", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
