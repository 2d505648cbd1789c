"""The VMM process: one guest, controlled over a unix socket.

    python -m vmigrate.vmm --dir DIR

DIR (made by whoever spawns us, normally the node agent) holds config.pb (a
VmConfig), and receives vmm.sock (the control socket, see proto/vmm.proto),
vmm.pid and console.log. The process lives until Shutdown, SIGTERM or SIGINT;
a guest that stops by itself leaves the process up so its console and state
can still be read. Startup errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from vmigrate.proto import state_pb2 as pb
from vmigrate.proto import vmm_pb2, vmm_pb2_grpc
from vmigrate.vmm import kvm
from vmigrate.vmm.console import Console
from vmigrate.vmm.machine import Machine, MachineError, MachineState, install_kick_handler

SOCKET_NAME = "vmm.sock"
PID_NAME = "vmm.pid"
CONFIG_NAME = "config.pb"
CONSOLE_NAME = "console.log"

_STATES = {
    MachineState.CREATED: vmm_pb2.VmmStatus.CREATED,
    MachineState.RUNNING: vmm_pb2.VmmStatus.RUNNING,
    MachineState.PAUSED: vmm_pb2.VmmStatus.PAUSED,
    MachineState.STOPPED: vmm_pb2.VmmStatus.STOPPED,
    MachineState.CRASHED: vmm_pb2.VmmStatus.CRASHED,
}


def test_guest_params(config: pb.VmConfig) -> object:
    from vmigrate.vmm.testguest.layout import TestGuestParams

    tg = config.test_guest
    return TestGuestParams(
        memory_bytes=config.memory_bytes, vcpus=config.vcpu_count,
        working_set_bytes=tg.working_set_bytes, dirty_rate_bytes_per_s=tg.dirty_rate_bytes_per_s,
        timer_hz=tg.timer_hz or 250, heartbeat_ms=tg.heartbeat_ms or 1000,
        verify_bytes_per_s=tg.verify_bytes_per_s, use_rtc=tg.use_rtc,
        fill_once=tg.fill_once)


class VmmService(vmm_pb2_grpc.VmmServicer):
    def __init__(self, vm_dir: Path, done: threading.Event) -> None:
        self.dir = vm_dir
        self._m: Machine | None = None
        self.console: Console | None = None
        self.done = done
        self.awaiting_commit = False
        self.migration_id = ""
        self.pause_reason = ""
        self._create_lock = threading.Lock()
        self.lazy: object | None = None      # LazyMemory while a lazy restore fills memory

    @property
    def m(self) -> Machine:
        if self._m is None:
            raise MachineError("this VMM is on standby: it has no guest yet")
        return self._m

    def create(self, config: pb.VmConfig, vm_dir: Path, memory_file: str = "") -> None:
        """Make the machine (at startup, or later for a standby VMM)."""
        with self._create_lock:
            if self._m is not None:
                raise MachineError("this VMM already has a guest")
            memory_fd = None
            if memory_file:
                try:
                    memory_fd = os.open(memory_file, os.O_RDWR | os.O_CLOEXEC)
                except OSError as e:
                    raise MachineError(f"cannot open memory file {memory_file}: "
                                       f"{e.strerror}") from None
            console = Console(vm_dir / CONSOLE_NAME)
            try:
                machine = Machine(config, console=console, memory_fd=memory_fd)
            except BaseException:
                console.close()
                raise
            self.dir = vm_dir
            (vm_dir / CONFIG_NAME).write_bytes(config.SerializeToString())
            (vm_dir / PID_NAME).write_text(f"{os.getpid()}\n")
            self.console = console
            self._m = machine

    def _status(self) -> vmm_pb2.VmmStatus:
        if self._m is None:
            return vmm_pb2.VmmStatus(state=vmm_pb2.VmmStatus.STANDBY, pid=os.getpid())
        m = self._m
        uptime = m.run_seconds + (time.monotonic() - m._run_started
                                  if m.state == MachineState.RUNNING else 0.0)
        return vmm_pb2.VmmStatus(
            name=m.config.name, state=_STATES[m.state], pid=os.getpid(), config=m.config,
            detail=m.detail, exits=m.exits, uptime_s=uptime, throttle_percent=m.throttle_percent,
            awaiting_commit=self.awaiting_commit, migration_id=self.migration_id,
            pause_reason=self.pause_reason if m.state == MachineState.PAUSED else "",
            console_end=m.console.end, features_in_use=m.features_in_use(),
            lazy_bytes_left=self._lazy_left())

    def _lazy_left(self) -> int:
        lazy = self.lazy
        if lazy is None or lazy.done.is_set():  # type: ignore[attr-defined]
            return 0
        copied, total = lazy.progress()  # type: ignore[attr-defined]
        return max(0, total - copied)

    def _fail(self, context: grpc.ServicerContext, e: Exception,
              code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> None:
        context.abort(code, str(e))

    def Create(self, request: vmm_pb2.CreateRequest,
               context: grpc.ServicerContext) -> vmm_pb2.VmmStatus:
        try:
            self.create(request.config, Path(request.dir) if request.dir else self.dir,
                        request.memory_file)
        except (MachineError, kvm.KvmError, ValueError) as e:
            self._fail(context, e)
        except OSError as e:
            self._fail(context, MachineError(f"cannot create the VM: {e.strerror or e}"))
        return self._status()

    def Status(self, request: vmm_pb2.Empty, context: grpc.ServicerContext) -> vmm_pb2.VmmStatus:
        return self._status()

    def Boot(self, request: vmm_pb2.Empty, context: grpc.ServicerContext) -> vmm_pb2.VmmStatus:
        try:
            kind = self.m.config.WhichOneof("guest")
            if kind == "test_guest":
                self.m.boot_test_guest(test_guest_params(self.m.config))
            elif kind == "linux":
                from vmigrate.vmm.boot import linux_loader

                self.m.boot_with(linux_loader(self.m.config.linux))
            else:
                raise MachineError("the VM config names no guest to boot")
        except (MachineError, ValueError, OSError) as e:
            self._fail(context, e)
        return self._status()

    def MapLazy(self, request: vmm_pb2.LazyRequest,
                context: grpc.ServicerContext) -> vmm_pb2.VmmStatus:
        from vmigrate.vmm.lazymem import LazyError, LazyMemory
        from vmigrate.vmm.vcpu import GuestStopped

        m = self.m
        if m.state != MachineState.CREATED or self.lazy is not None:
            raise MachineError("lazy memory must be set up once, before the restore")

        def damaged(why: str) -> None:
            m._stop_from_guest(GuestStopped(f"lazy restore: {why}", True))
        try:
            self.lazy = LazyMemory(m.memory.base, m.memory.size, request.path,
                                   request.image_offset, request.page_index, damaged)
        except LazyError as e:
            raise MachineError(str(e)) from None
        self.lazy.start()
        return self._status()

    def Restore(self, request: vmm_pb2.RestoreRequest,
                context: grpc.ServicerContext) -> vmm_pb2.VmmStatus:
        try:
            self.m.restore(request.state)
        except (MachineError, ValueError) as e:
            damage = getattr(self.lazy, "damaged", "")
            # A lazy restore that found damage before the state came stopped
            # the machine: that, not "crashed", is what the user must hear.
            self._fail(context, MachineError(f"lazy restore: {damage}") if damage else e)
        if request.console_history:
            self.m.console.seed(request.console_history)
        self.migration_id = request.migration_id
        self.awaiting_commit = bool(request.migration_id)
        return self._status()

    def Pause(self, request: vmm_pb2.PauseRequest,
              context: grpc.ServicerContext) -> vmm_pb2.PauseReply:
        m = self.m
        try:
            was_paused = m.state == MachineState.PAUSED
            reply = vmm_pb2.PauseReply(pause_ms=m.pause())
            if not was_paused:
                self.pause_reason = request.reason or "user"
            if request.fetch_dirty_log:
                if not m.memory.dirty_logging:
                    raise MachineError("dirty logging is not on")
                reply.dirty_bitmap = m.memory.fetch_dirty_bitmap().tobytes()
            if request.save:
                t0 = time.perf_counter()
                reply.state.CopyFrom(m.save())
                reply.save_ms = (time.perf_counter() - t0) * 1000
            if request.console:
                reply.console, reply.console_end = m.console.read(request.console_from)
            return reply
        except (MachineError, OSError) as e:
            self._fail(context, e)
            raise

    def Resume(self, request: vmm_pb2.ResumeRequest,
               context: grpc.ServicerContext) -> vmm_pb2.VmmStatus:
        try:
            if request.keep_paused:
                self.m.activate_paused()
                self.pause_reason = "user"
            else:
                self.m.resume()
        except MachineError as e:
            self._fail(context, e)
        self.awaiting_commit = False
        return self._status()

    def Save(self, request: vmm_pb2.Empty, context: grpc.ServicerContext) -> pb.VmState:
        try:
            return self.m.save()
        except (MachineError, OSError) as e:
            self._fail(context, e)
            raise

    def Memory(self, request: vmm_pb2.Empty, context: grpc.ServicerContext) -> vmm_pb2.MemoryInfo:
        mem = self.m.memory
        lazy = self.lazy
        # Another process must not read guest memory while a lazy restore is
        # filling it (a missing page read elsewhere would become a zero page).
        if lazy is not None and not lazy.wait(600):  # type: ignore[attr-defined]
            raise MachineError("guest memory is still arriving from its checkpoint")
        layout = pb.MemoryLayout(page_size=4096, regions=[
            pb.MemoryRegion(guest_phys_addr=r.guest_phys_addr, size=r.size,
                            file_offset=r.file_offset) for r in mem.regions])
        return vmm_pb2.MemoryInfo(path=mem.proc_path(), size=mem.size, layout=layout)

    def DirtyLog(self, request: vmm_pb2.DirtyLogRequest,
                 context: grpc.ServicerContext) -> vmm_pb2.DirtyLogReply:
        mem = self.m.memory
        op = request.op
        try:
            if op == vmm_pb2.DirtyLogRequest.START:
                mem.set_dirty_logging(True)
                return vmm_pb2.DirtyLogReply()
            if op == vmm_pb2.DirtyLogRequest.STOP:
                mem.set_dirty_logging(False)
                return vmm_pb2.DirtyLogReply()
            if op == vmm_pb2.DirtyLogRequest.FETCH:
                if not mem.dirty_logging:
                    raise MachineError("dirty logging is not on")
                t0 = time.perf_counter()
                bitmap = mem.fetch_dirty_bitmap()
                ms = (time.perf_counter() - t0) * 1000
                count = int(np.unpackbits(bitmap.view(np.uint8)).sum())
                return vmm_pb2.DirtyLogReply(bitmap=bitmap.tobytes(), dirty_pages=count,
                                             fetch_ms=ms)
        except (OSError, MachineError) as e:
            self._fail(context, e)
        self._fail(context, ValueError("unknown dirty log operation"),
                   grpc.StatusCode.INVALID_ARGUMENT)
        raise AssertionError

    def SetThrottle(self, request: vmm_pb2.ThrottleRequest,
                    context: grpc.ServicerContext) -> vmm_pb2.Empty:
        self.m.set_throttle(request.percent)
        return vmm_pb2.Empty()

    def ConsoleRead(self, request: vmm_pb2.ConsoleReadRequest,
                    context: grpc.ServicerContext) -> Iterator[vmm_pb2.ConsoleData]:
        console = self.m.console
        if request.only_new:
            offset = console.end
        else:
            offset = max(0, console.end - request.tail_bytes) if request.tail_bytes else 0
        data, offset = console.read(offset)
        yield vmm_pb2.ConsoleData(data=data, end_offset=offset)
        while request.follow and context.is_active() and not self.done.is_set():
            if console.wait(offset, 0.5):
                data, offset = console.read(offset)
                if data:
                    yield vmm_pb2.ConsoleData(data=data, end_offset=offset)

    def ConsoleWrite(self, request: vmm_pb2.ConsoleData,
                     context: grpc.ServicerContext) -> vmm_pb2.Empty:
        self.m.uart.receive(request.data)
        return vmm_pb2.Empty()

    def Shutdown(self, request: vmm_pb2.ShutdownRequest,
                 context: grpc.ServicerContext) -> vmm_pb2.Empty:
        if self._m is not None:
            self._m.stop(request.reason or "stopped")
        self.done.set()
        return vmm_pb2.Empty()


def _clean_errors(cls: type) -> type:
    """Every RPC answers an expected failure with FAILED_PRECONDITION and one
    line, not gRPC's 'Exception calling application' with a traceback."""
    import functools
    import inspect

    for name in vmm_pb2.DESCRIPTOR.services_by_name["Vmm"].methods_by_name:
        fn = getattr(cls, name)
        if inspect.isgeneratorfunction(fn):
            continue          # ConsoleRead: its errors surface in the stream

        def wrap(fn: object) -> object:
            @functools.wraps(fn)  # type: ignore[arg-type]
            def method(self: object, request: object, context: grpc.ServicerContext) -> object:
                try:
                    return fn(self, request, context)  # type: ignore[operator]
                except (MachineError, kvm.KvmError) as e:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            return method
        setattr(cls, name, wrap(fn))
    return cls


VmmService = _clean_errors(VmmService)


def _die(msg: str) -> None:
    print(f"vmm: {msg}", file=sys.stderr)
    sys.exit(2)


def serve(vm_dir: Path, memory_file: str | None = None, standby: bool = False) -> None:
    from vmigrate.vmm.malloc_tuning import tune_malloc

    tune_malloc()
    install_kick_handler()
    done = threading.Event()
    service = VmmService(vm_dir, done)
    if standby:
        try:      # fail now, not when a guest is waiting for us
            kvm.Kvm().require_capabilities()
        except kvm.KvmError as e:
            _die(str(e))
    else:
        try:
            config = pb.VmConfig.FromString((vm_dir / CONFIG_NAME).read_bytes())
        except (OSError, ValueError) as e:
            _die(f"cannot read {vm_dir / CONFIG_NAME}: {e}")
        try:
            service.create(config, vm_dir, memory_file or "")
        except (MachineError, kvm.KvmError, ValueError) as e:
            _die(str(e))
        except OSError as e:
            _die(f"cannot create the VM: {e.strerror or e}")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="ctl"),
                         options=[("grpc.max_receive_message_length", 64 << 20),
                                  ("grpc.max_send_message_length", 64 << 20)])
    vmm_pb2_grpc.add_VmmServicer_to_server(service, server)
    sock = vm_dir / SOCKET_NAME
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    os.chmod(sock, 0o600)
    (vm_dir / PID_NAME).write_text(f"{os.getpid()}\n")

    def on_signal(_sig: int, _frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not done.wait(0.5):
            pass
    finally:
        machine = service._m
        if machine is not None:
            machine.stop("VMM shut down")
        if service.lazy is not None:
            service.lazy.close()  # type: ignore[attr-defined]
        server.stop(grace=0.5).wait(2)
        if service.console is not None:
            service.console.close()
        if machine is not None:
            machine.close()
        # Where they are now (a standby VMM moves), and only if still ours: a
        # directory can have been handed to another VMM (a same-host upgrade).
        pid_file = service.dir / PID_NAME
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text()) == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    (service.dir / SOCKET_NAME).unlink()
                pid_file.unlink()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vmigrate.vmm", description=__doc__)
    ap.add_argument("--dir", required=True, type=Path, help="the guest's directory")
    ap.add_argument("--memory-file", help="map this memory file instead of a fresh memfd "
                                          "(same-host upgrade: the old VMM's memory)")
    ap.add_argument("--standby", action="store_true",
                    help="start without a guest and wait for a Create call")
    opts = ap.parse_args(argv)
    serve(opts.dir, opts.memory_file, opts.standby)
