"""A real, throw-away etcd server for tests.

``EtcdServer`` runs the ``etcd`` binary (Debian's ``etcd-server`` package, or
``$VMIGRATE_ETCD``) as a single-member cluster on 127.0.0.1, on free ports,
with its data in a temporary directory; ``start()`` returns once ``/health``
says so, ``stop()`` always ends the process (SIGTERM, then SIGKILL) and
``restart()`` keeps the data and the ports. Use it as a context manager::

    with EtcdServer() as etcd:
        store = open_store(etcd.url)

Short heartbeat/election intervals make it elect itself within ~100 ms and
allow leases of 1 s (etcd's minimum lease TTL is 1.5 election timeouts).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from types import TracebackType


def etcd_binary() -> str | None:
    path = os.environ.get("VMIGRATE_ETCD") or shutil.which("etcd")
    if path is None and os.access("/usr/bin/etcd", os.X_OK):
        path = "/usr/bin/etcd"
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    def __init__(self, *, binary: str | None = None, start_timeout_s: float = 15.0) -> None:
        binary = binary or etcd_binary()
        if binary is None:
            raise FileNotFoundError(
                "etcd not found: install Debian's etcd-server (scripts/setup.sh) "
                "or set VMIGRATE_ETCD"
            )
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.data_dir = tempfile.mkdtemp(prefix="vmigrate-etcd-")
        self.client_port = 0
        self.peer_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_path = os.path.join(self.data_dir, "etcd.log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        """A store URL for ``open_store`` (prefix /vmigrate)."""
        return f"etcd://127.0.0.1:{self.client_port}"

    def _args(self) -> list[str]:
        client = self.endpoint
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary,
            "--name=test",
            f"--data-dir={os.path.join(self.data_dir, 'data')}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--logger=zap",
            "--log-level=warn",
        ]

    def start(self) -> EtcdServer:
        if self.proc is not None:
            return self
        fresh = self.client_port == 0
        for attempt in range(3):
            if fresh:
                self.client_port, self.peer_port = free_port(), free_port()
            log = open(self._log_path, "ab")  # noqa: SIM115 -- handed to the child
            try:
                self.proc = subprocess.Popen(
                    self._args(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C of the tests does not reach it first
                )
            finally:
                log.close()
            try:
                self._wait_healthy()
                return self
            except RuntimeError:
                self.stop()
                if not fresh or attempt == 2 or "address already in use" not in self.log_tail():
                    raise
        return self  # not reached

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {self.proc.returncode} while starting: {self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.endpoint + "/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd not healthy after {self.start_timeout_s}s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self._log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> EtcdServer:
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __del__(self) -> None:
        # Last resort (e.g. an interrupted test run): never leave etcd behind.
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
