"""The guest's serial console output: kept in memory for `vmigrate logs`,
mirrored to a file, and handed to any number of followers.

Offsets are absolute byte counts since the VMM started, so a follower that
falls behind the kept history simply resumes at the oldest byte still kept.
"""

from __future__ import annotations

import threading
from pathlib import Path

HISTORY_BYTES = 4 << 20


class Console:
    def __init__(self, log_path: Path | None = None, history_bytes: int = HISTORY_BYTES) -> None:
        self._cond = threading.Condition()
        self._buf = bytearray()
        self._start = 0               # absolute offset of _buf[0]
        self._limit = history_bytes
        self._closed = False
        if log_path is not None and log_path.exists():
            # History that came with the guest (a checkpoint, a migration).
            with open(log_path, "rb") as f:
                f.seek(max(0, log_path.stat().st_size - history_bytes))
                self._buf += f.read()
        self._log = open(log_path, "ab", buffering=0) if log_path else None  # noqa: SIM115

    @property
    def end(self) -> int:
        with self._cond:
            return self._start + len(self._buf)

    def write(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            if len(self._buf) > self._limit:
                drop = len(self._buf) - self._limit
                del self._buf[:drop]
                self._start += drop
            self._cond.notify_all()
        if self._log is not None:
            try:
                self._log.write(data)
            except OSError:
                self._log = None      # a full disk must not stop the guest

    def seed(self, history: bytes) -> None:
        """Put `history` before everything written so far (offsets shift)."""
        with self._cond:
            self._buf[:0] = history
            if len(self._buf) > self._limit:
                drop = len(self._buf) - self._limit
                del self._buf[:drop]
            self._cond.notify_all()

    def read(self, offset: int) -> tuple[bytes, int]:
        """Bytes from `offset` (clamped to what is kept) and the new offset."""
        with self._cond:
            offset = max(offset, self._start)
            data = bytes(self._buf[offset - self._start:])
            return data, offset + len(data)

    def wait(self, offset: int, timeout: float) -> bool:
        """Block until there is output past `offset`; False on timeout or close."""
        with self._cond:
            if self._start + len(self._buf) > offset:
                return True
            if self._closed:
                return False
            self._cond.wait(timeout)
            return self._start + len(self._buf) > offset

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def closed(self) -> bool:
        return self._closed
