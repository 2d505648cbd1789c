"""Linux-guest commands: `vmigrate image build`, `vmigrate console NAME`, and the
checks `vmigrate run --linux` makes (see docs/linux-guests.md).

`register(cmd)` adds the commands to the parser (cmd(name, fn, help) ->
ArgumentParser, as in cli/main.py); `add_run_options()` and
`check_linux_host()` are for `vmigrate run`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from vmigrate.cli import output
from vmigrate.cli.context import CliError
from vmigrate.proto import agent_pb2

if TYPE_CHECKING:
    from vmigrate.cli.main import Session

DETACH_KEY = 0x1D            # Ctrl-]
DETACH_NAME = "Ctrl-]"
_MOVED_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.FAILED_PRECONDITION)


# ---------------------------------------------------------------- image build


def cmd_image(s: Session, a: argparse.Namespace) -> int:
    """`vmigrate image build [--out DIR] [--force]`."""
    from pathlib import Path

    from vmigrate.vmm.image import ImageBuildError, build_image, default_image_dir

    out_dir = Path(a.out) if a.out else default_image_dir()
    say: Callable[[str], None] = (lambda _m: None) if a.json else \
        (lambda m: print(f"image: {m}", file=sys.stderr, flush=True))
    try:
        img = build_image(out_dir, say, force=a.force)
    except ImageBuildError as e:
        raise CliError(str(e)) from None
    info = {"directory": str(img.directory), "kernel": img.kernel_version,
            "bzimage": str(img.bzimage), "vmlinux": str(img.vmlinux),
            "initramfs": str(img.initramfs), "workload": str(img.workload)}
    if a.json:
        output.print_json(info)
    else:
        print(f"image {img.directory}: kernel {img.kernel_version}")
        if a.out:
            print(f"  run it with: vmigrate run NAME --kernel {img.vmlinux} "
                  f"--initrd {img.initramfs} --memory 256M")
    return 0


# ---------------------------------------------------------------- run --linux


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options `vmigrate run` needs for Linux guests."""
    p.add_argument("--kernel-only", action="store_true",
                   help="boot a Linux guest even on a host that cannot run its user space "
                        "(the kernel boots; its first process cannot)")


def check_linux_host(s: Session, host: str, a: argparse.Namespace) -> None:
    """Refuse, in one line, a Linux guest on a host whose KVM cannot run guest user
    space, unless --kernel-only says to boot the kernel anyway."""
    if getattr(a, "kernel_only", False):
        return
    try:
        info = s.agent(host).GetHostInfo(agent_pb2.AgentEmpty(), timeout=60)
    except grpc.RpcError as e:
        raise CliError(f"cannot ask {host} whether it runs Linux guests: "
                       f"{e.details() if hasattr(e, 'details') else e}") from None
    if not info.runs_guest_user_space:
        reason = info.user_space_probe_detail or "the user-space probe failed"
        raise CliError(f"host {host} cannot run a Linux guest's user space ({reason}); "
                       "--kernel-only boots the kernel anyway")


# ---------------------------------------------------------------- console


class _RawTerminal:
    """stdin in raw mode while the console is attached (if it is a terminal)."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        self.saved: list | None = None

    def __enter__(self) -> _RawTerminal:
        if os.isatty(self.fd):
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def _note(text: str) -> None:
    """A message of ours between guest output (CR LF: the terminal may be raw)."""
    sys.stderr.write(f"\r\n[{text}]\r\n")
    sys.stderr.flush()


class ConsoleSession:
    """Guest output to stdout, stdin to the guest, following the VM across hosts."""

    def __init__(self, s: Session, name: str, tail: int) -> None:
        self.s = s
        self.name = name
        self.tail = tail
        self.host = s.host_of(name)
        self.done = threading.Event()
        self.reason = ""
        self._stream: grpc.Future | None = None
        self._lock = threading.Lock()

    def _relocate(self) -> bool:
        """After an error: True if the VM runs somewhere (perhaps elsewhere) now."""
        try:
            new = self.s.host_of(self.name)
        except CliError:
            self.reason = f"{self.name} is gone"
            return False
        if new != self.host:
            _note(f"{self.name} moved to {new}")
            with self._lock:
                self.host = new
            return True
        try:
            info = self.s.agent(new).GetVm(agent_pb2.VmRef(name=self.name), timeout=10)
        except (grpc.RpcError, CliError):
            return True               # in the middle of a move: try again
        if info.state in ("stopped", "crashed", "lost"):
            self.reason = f"{self.name} {info.state}" + (f": {info.detail}" if info.detail else "")
            return False
        return True

    def read_loop(self) -> None:
        out = sys.stdout.buffer
        tail = self.tail
        failures = 0
        last_error = "the stream ended"
        while not self.done.is_set():
            try:
                stream = self.s.agent(self.host).ReadConsole(agent_pb2.ReadConsoleRequest(
                    name=self.name, follow=True, tail_bytes=tail))
                self._stream = stream
                for chunk in stream:
                    out.write(chunk.data)
                    out.flush()
                    failures = 0
                # The stream ended: the VMM stopped, or the VM left this host.
            except grpc.RpcError as e:
                if self.done.is_set() or e.code() == grpc.StatusCode.CANCELLED:
                    return
                last_error = e.details() or str(e.code())
            except CliError as e:
                self.reason = str(e)
                break
            # Whatever ended the stream: the guest moved, stopped, or is being moved.
            if not self._relocate():
                break
            failures += 1
            if failures > 50:
                self.reason = f"lost the console of {self.name}: {last_error}"
                break
            tail = 0          # a new stream on the new host: only new output
            time.sleep(min(1.0, 0.1 * failures))
        self.done.set()

    def send(self, data: bytes) -> None:
        for _ in range(50):
            try:
                self.s.agent(self.host).WriteConsole(
                    agent_pb2.WriteConsoleRequest(name=self.name, data=data), timeout=10)
                return
            except grpc.RpcError as e:
                if e.code() not in _MOVED_CODES or not self._relocate():
                    self.reason = f"console input: {e.details()}"
                    self.done.set()
                    return
                time.sleep(0.2)

    def write_loop(self) -> None:
        fd = sys.stdin.fileno()
        interactive = os.isatty(fd)
        while not self.done.is_set():
            try:
                data = os.read(fd, 1024)
            except OSError:
                break
            if not data:                        # EOF: keep showing output
                if not interactive:
                    self.done.wait()
                break
            if DETACH_KEY in data:
                data = data[:data.index(DETACH_KEY)]
                if data:
                    self.send(data)
                self.reason = "detached"
                break
            self.send(data)
        self.done.set()

    def close(self) -> None:
        self.done.set()
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.cancel()


def cmd_console(s: Session, a: argparse.Namespace) -> int:
    """`vmigrate console NAME`: the guest's serial console, both ways."""
    tail = 4096 if a.tail is None else max(0, a.tail)
    session = ConsoleSession(s, a.name, tail)
    interactive = os.isatty(sys.stdin.fileno())
    if interactive:
        print(f"[attached to {a.name} on {session.host}; {DETACH_NAME} detaches]",
              file=sys.stderr)
    reader = threading.Thread(target=session.read_loop, name="console-out", daemon=True)
    reader.start()
    try:
        with _RawTerminal():
            writer = threading.Thread(target=session.write_loop, name="console-in",
                                      daemon=True)
            writer.start()
            while not session.done.wait(0.2):
                pass
    except KeyboardInterrupt:
        session.reason = "interrupted"
    finally:
        session.close()
    reason = session.reason or "console closed"
    _note(reason)
    return 0 if reason in ("detached", "interrupted", "console closed") else 1


# ---------------------------------------------------------------- registration


def register(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    p = cmd("image", cmd_image, "build the default Linux guest image",
            "`vmigrate image build` downloads Debian's cloud kernel and busybox-static\n"
            "(without installing them), compiles the workload and writes bzImage, the raw\n"
            "vmlinux, an initramfs and a manifest. `vmigrate run NAME --linux` boots it.\n"
            "An up-to-date image is reused.")
    p.add_argument("action", choices=["build"], help="what to do (build)")
    p.add_argument("--out", metavar="DIR", help="image directory (default: "
                   "$VMIGRATE_IMAGE_DIR or ~/.cache/vmigrate/linux-guest)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")

    p = cmd("console", cmd_console, "attach to a guest's serial console",
            f"Guest output goes to the terminal, keys go to the guest; {DETACH_NAME}\n"
            "detaches (the guest keeps running). The console follows the guest when it\n"
            "is migrated to another host.")
    p.add_argument("name")
    p.add_argument("--tail", type=int, metavar="BYTES",
                   help="show this much earlier output first (default 4096)")
