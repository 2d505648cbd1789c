"""A small writer for the cpio "newc" format, the format Linux unpacks as initramfs.

Each entry is a 110-byte ASCII header ("070701" and 13 eight-digit hex
fields), the NUL-terminated name padded to 4 bytes, then the data padded to
4 bytes; the archive ends with an entry named ``TRAILER!!!``. See the
kernel's Documentation/driver-api/early-userspace/buffer-format.rst.

Output is deterministic (fixed owner and mtime, inode numbers in order), and
parent directories are added automatically before their contents, because the
kernel's unpacker does not create missing parents.
"""

from __future__ import annotations

import stat
from pathlib import PurePosixPath
from typing import BinaryIO

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    """Writes a newc archive to a binary file object; call close() to finish it."""

    def __init__(self, out: BinaryIO, mtime: int = 0) -> None:
        self._out = out
        self._mtime = mtime
        self._ino = 0
        self._names: set[str] = set()
        self._closed = False
        self.bytes_written = 0

    # -- entries ---------------------------------------------------------------

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        """Add a directory (and any missing parents)."""
        name = self._norm(name)
        if name in self._names:
            return
        self._parents(name)
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file with the given contents."""
        name = self._new_name(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        """Add a symbolic link; the target is stored as the entry's data."""
        name = self._new_name(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (no privileges needed to write one)."""
        name = self._new_name(name)
        self._entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer and pad the archive to a multiple of 512 bytes."""
        if self._closed:
            return
        self._entry(TRAILER, 0, b"", ino=0, nlink=1)
        self._write(b"\0" * ((512 - self.bytes_written % 512) % 512))
        self._closed = True

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()

    # -- internals -------------------------------------------------------------

    @staticmethod
    def _norm(name: str) -> str:
        path = PurePosixPath(name.lstrip("/"))
        if not path.parts or ".." in path.parts:
            raise ValueError(f"bad archive path: {name!r}")
        return str(path)

    def _new_name(self, name: str) -> str:
        name = self._norm(name)
        if name in self._names:
            raise ValueError(f"duplicate archive path: {name!r}")
        self._parents(name)
        return name

    def _parents(self, name: str) -> None:
        for parent in reversed(PurePosixPath(name).parents):
            if str(parent) != "." and str(parent) not in self._names:
                self._entry(str(parent), stat.S_IFDIR | 0o755, b"", nlink=2)

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        ino: int | None = None,
    ) -> None:
        if self._closed:
            raise ValueError("archive already closed")
        if ino is None:
            self._ino += 1
            ino = self._ino
        if name != TRAILER:
            self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (
            ino,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            self._mtime,
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check (only used by the "070702" crc variant)
        )
        header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        self._write(header + encoded + b"\0" * _pad4(len(header) + len(encoded)))
        self._write(data + b"\0" * _pad4(len(data)))

    def _write(self, chunk: bytes) -> None:
        self._out.write(chunk)
        self.bytes_written += len(chunk)
