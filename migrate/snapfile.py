"""The checkpoint file format (docs/file-format.md): the one module that reads
and writes it.

    prefix   "VMIGSNAP" | format version u32 | reserved u32             16 bytes
    frames   type u8 | flags u8 | 0 u16 | length u32 | xxh3_64 u64 | payload
             (the hash covers the first 8 header bytes and the payload)
             HEADER, DESCRIPTORS, then MEMORY* or one MEMORY_IMAGE, STATE,
             PAGE_INDEX, CONSOLE, TRAILER. A MEMORY_IMAGE frame is followed, at a
             page-aligned offset, by the guest's memory stored raw (mapped layout).
    footer   "VMIGEND\\0" | offset of the TRAILER frame u64               16 bytes

Every payload is a protobuf message (proto/file.proto, proto/state.proto),
zstd-compressed when the frame's flag says so. The file is self-describing:
the DESCRIPTORS frame holds the schema it was written with, so `vmigrate
inspect` can decode any file from any version. A complete file ends with the
footer pointing at the trailer; the trailer counts the frames and hashes
their checksums in order, so a truncated, reordered or spliced file is told
from a complete one. Files are written to a temporary name, fsynced, then
renamed: a crash or a full disk never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import xxhash
import zstandard
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError, Message

from vmigrate.proto import file_pb2, state_pb2

MAGIC = b"VMIGSNAP"
FOOTER_MAGIC = b"VMIGEND\0"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<8sII")
FRAME = struct.Struct("<BBHIQ")
FOOTER = struct.Struct("<8sQ")

HEADER, DESCRIPTORS, STATE, MEMORY, PAGE_INDEX, CONSOLE, MEMORY_IMAGE = 1, 2, 3, 4, 5, 6, 8
TRAILER = 0x7F
FRAME_NAMES = {HEADER: "header", DESCRIPTORS: "descriptors", STATE: "state", MEMORY: "memory",
               PAGE_INDEX: "page index", CONSOLE: "console", MEMORY_IMAGE: "memory image",
               TRAILER: "trailer"}
IMAGE_PAYLOAD = 18            # MemoryImage: two fixed64 fields
FLAG_ZSTD = 0x01

_libc = ctypes.CDLL(None, use_errno=True)
MAX_FRAME = 64 << 20          # bytes of payload on disk
MAX_INFLATED = 64 << 20       # bytes a compressed payload may inflate to
MEMORY_ALIGN = 4096


class SnapshotError(Exception):
    """A checkpoint file cannot be used; the message says why in one line."""


class Truncated(SnapshotError):
    pass


class Corrupt(SnapshotError):
    pass


class Unsupported(SnapshotError):
    pass


def frame_checksum(kind: int, flags: int, payload: bytes) -> int:
    """xxh3_64 over the frame's type, flags, reserved and length fields and its payload,
    so a damaged frame header is caught as surely as a damaged payload."""
    h = xxhash.xxh3_64(FRAME.pack(kind, flags, 0, len(payload), 0)[:8])
    h.update(payload)
    return h.intdigest()


def schema_descriptors() -> bytes:
    fds = descriptor_pb2.FileDescriptorSet()
    for mod in (state_pb2, file_pb2):
        fdp = fds.file.add()
        mod.DESCRIPTOR.CopyToProto(fdp)
    return fds.SerializeToString()


# ---------------------------------------------------------------- writing


class SnapshotWriter:
    """Writes one checkpoint file atomically (temporary name, fsync, rename)."""

    def __init__(self, path: Path, header: file_pb2.FileHeader) -> None:
        self.path = path
        if path.exists() and path.is_dir():
            raise SnapshotError(f"{path} is a directory")
        if not path.parent.is_dir():
            raise SnapshotError(f"directory {path.parent} does not exist")
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        if not header.file_id:
            header.file_id = uuid.uuid4().hex
        self.header = header
        self._cctx = zstandard.ZstdCompressor(level=3)
        self._chain = xxhash.xxh3_64()
        self._frames = 0
        try:
            self._f = open(self.tmp, "xb")  # noqa: SIM115
            self._f.write(PREFIX.pack(MAGIC, FORMAT_VERSION, 0))
        except OSError as e:
            raise _write_error(e, path) from None
        self._frame(HEADER, header.SerializeToString())
        self._frame(DESCRIPTORS, schema_descriptors(), compress=True)

    @property
    def file_id(self) -> str:
        return self.header.file_id

    def _frame(self, kind: int, payload: bytes, compress: bool = False) -> int:
        flags = 0
        if compress:
            packed = self._cctx.compress(payload)
            if len(packed) < len(payload):
                payload, flags = packed, FLAG_ZSTD
        if len(payload) > MAX_FRAME:
            raise SnapshotError(f"a {FRAME_NAMES[kind]} record of {len(payload)} bytes is "
                                f"larger than the format allows ({MAX_FRAME})")
        checksum = frame_checksum(kind, flags, payload)
        try:
            offset = self._f.tell()
            self._f.write(FRAME.pack(kind, flags, 0, len(payload), checksum))
            self._f.write(payload)
        except OSError as e:
            raise _write_error(e, self.path) from None
        self._chain.update(checksum.to_bytes(8, "little"))
        self._frames += 1
        return offset

    def begin_image(self, length: int) -> int:
        """Start the mapped layout: a MEMORY_IMAGE frame, then `length` bytes of
        raw memory at a page-aligned offset (a hole until pages are written).
        Returns that offset; pages go in with write_image(); the frames
        written afterwards follow the image."""
        here = self._f.tell() + FRAME.size + IMAGE_PAYLOAD
        offset = (here + MEMORY_ALIGN - 1) // MEMORY_ALIGN * MEMORY_ALIGN
        payload = file_pb2.MemoryImage(offset=offset, length=length).SerializeToString()
        assert len(payload) == IMAGE_PAYLOAD
        self._frame(MEMORY_IMAGE, payload)
        try:
            self._f.flush()
            os.ftruncate(self._f.fileno(), offset + length)
            self._f.seek(offset + length)
        except OSError as e:
            raise _write_error(e, self.path) from None
        self.image = (offset, length)
        return offset

    def write_image(self, file_offset: int, data: bytes | memoryview) -> None:
        """Pages of guest memory, at their offset in the guest's memory file."""
        offset, length = self.image
        if file_offset + len(data) > length:
            raise SnapshotError("a page lies beyond the memory image")
        try:
            os.pwrite(self._f.fileno(), data, offset + file_offset)
        except OSError as e:
            raise _write_error(e, self.path) from None

    def zero_image(self, file_offset: int, size: int) -> None:
        """Pages that became zero: made a hole again (or written as zeros)."""
        offset, _ = self.image
        r = _libc.fallocate(self._f.fileno(), 0x03, ctypes.c_long(offset + file_offset),
                            ctypes.c_long(size))
        if r != 0:
            self.write_image(file_offset, bytes(size))

    def write_memory(self, round_: int, chunks: list[state_pb2.MemoryChunk]) -> None:
        self._frame(MEMORY, file_pb2.MemoryRecord(round=round_, chunks=chunks).SerializeToString())

    def write_state(self, state: state_pb2.VmState) -> None:
        self._frame(STATE, state.SerializeToString(), compress=True)

    def write_page_index(self, hashes: bytes) -> None:
        self._frame(PAGE_INDEX, file_pb2.PageIndex(hashes=hashes).SerializeToString(),
                    compress=True)

    def write_console(self, data: bytes) -> None:
        self._frame(CONSOLE, file_pb2.ConsoleRecord(data=data).SerializeToString(), compress=True)

    def finish(self, trailer: file_pb2.FileTrailer) -> int:
        """Seal the file and move it into place; returns its size."""
        trailer.records = self._frames
        trailer.chain_hash = self._chain.intdigest()
        offset = self._frame(TRAILER, trailer.SerializeToString())
        try:
            self._f.write(FOOTER.pack(FOOTER_MAGIC, offset))
            self._f.flush()
            os.fsync(self._f.fileno())
            size = self._f.tell()
            self._f.close()
            os.replace(self.tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            self.abort()
            raise _write_error(e, self.path) from None
        return size

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def _write_error(e: OSError, path: Path) -> SnapshotError:
    if e.errno == errno.ENOSPC:
        return SnapshotError(f"no space left on the device writing {path}")
    if e.errno == errno.EDQUOT:
        return SnapshotError(f"disk quota exceeded writing {path}")
    return SnapshotError(f"cannot write {path}: {e.strerror}")


# ---------------------------------------------------------------- reading


@dataclass
class Frame:
    kind: int
    payload: bytes
    offset: int


@dataclass
class Snapshot:
    """A checkpoint file, checked as far as its header and trailer go."""

    path: Path
    header: file_pb2.FileHeader
    trailer: file_pb2.FileTrailer
    size: int
    descriptors: bytes = b""
    image: tuple[int, int] | None = None   # (offset, length) of a mapped-layout image
    state_bytes: bytes = b""      # VmState at header.state_version, decoded by the caller
    console: bytes = b""
    page_index: bytes = b""
    frame_counts: dict[str, int] = field(default_factory=dict)


def _open(path: Path) -> tuple[object, int]:
    """Open a checkpoint for reading; only a regular file is one. O_NONBLOCK so
    that a FIFO (or a device) named here, or as an incremental file's parent,
    is refused instead of blocking the reader forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no such file") from None
    except PermissionError:
        raise SnapshotError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise SnapshotError(f"{path} is a directory, not a checkpoint file") from None
    except OSError as e:
        raise SnapshotError(f"cannot open {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise SnapshotError(f"{path} is a directory, not a checkpoint file")
        raise SnapshotError(f"{path} is not a regular file, so not a checkpoint file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), st.st_size


def _parse(msg: Message, payload: bytes, what: str, path: Path) -> Message:
    try:
        msg.ParseFromString(payload)
    except DecodeError:
        raise Corrupt(f"{path}: the {what} record does not decode") from None
    return msg


class SnapshotReader:
    """Reads a checkpoint file frame by frame, checking everything it reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f, self.size = _open(path)
        f = self._f
        if self.size == 0:
            raise Truncated(f"{path} is empty")
        prefix = f.read(PREFIX.size)
        if len(prefix) < PREFIX.size or not prefix.startswith(MAGIC[:len(prefix)]):
            if not prefix.startswith(MAGIC[:min(len(prefix), len(MAGIC))]):
                raise Corrupt(f"{path} is not a vmigrate checkpoint (wrong magic)")
            raise Truncated(f"{path} is truncated (no complete header)")
        magic, version, reserved = PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise Corrupt(f"{path} is not a vmigrate checkpoint (wrong magic)")
        if reserved:
            raise Corrupt(f"{path}: damaged header (reserved field is {reserved:#x})")
        if version > FORMAT_VERSION:
            raise Unsupported(f"{path} uses file format {version}; this vmigrate reads up to "
                              f"{FORMAT_VERSION}: upgrade vmigrate to read it")
        if version < 1:
            raise Corrupt(f"{path} has an invalid format version {version}")
        self.trailer_offset = self._read_footer()

    def _read_footer(self) -> int:
        if self.size < PREFIX.size + FOOTER.size:
            raise Truncated(f"{self.path} is truncated (no trailer)")
        self._f.seek(self.size - FOOTER.size)
        magic, offset = FOOTER.unpack(self._f.read(FOOTER.size))
        if magic != FOOTER_MAGIC:
            raise Truncated(f"{self.path} is truncated or incomplete (no end marker): "
                            "it was not finished writing")
        if not PREFIX.size <= offset <= self.size - FOOTER.size - FRAME.size:
            raise Corrupt(f"{self.path}: the end marker points outside the file")
        return offset

    def _read_frame(self, offset: int, limit: int) -> tuple[Frame, int, int]:
        """The frame at `offset`, its checksum and its length on disk."""
        self._f.seek(offset)
        head = self._f.read(FRAME.size)
        if len(head) < FRAME.size or offset + FRAME.size > limit:
            raise Truncated(f"{self.path} is truncated at byte {offset}")
        kind, flags, reserved, length, checksum = FRAME.unpack(head)
        if kind not in FRAME_NAMES or reserved:
            raise Corrupt(f"{self.path}: unknown record type {kind} at byte {offset}")
        if length > MAX_FRAME:
            raise Corrupt(f"{self.path}: a {FRAME_NAMES[kind]} record at byte {offset} claims "
                          f"{length} bytes (more than the {MAX_FRAME} the format allows)")
        if offset + FRAME.size + length > limit:
            raise Truncated(f"{self.path} is truncated in a {FRAME_NAMES[kind]} record "
                            f"at byte {offset}")
        payload = self._f.read(length)
        if len(payload) != length:
            raise Truncated(f"{self.path} is truncated at byte {offset}")
        if frame_checksum(kind, flags, payload) != checksum:
            raise Corrupt(f"{self.path}: checksum mismatch in the {FRAME_NAMES[kind]} record "
                          f"at byte {offset}: the file is damaged")
        if flags & ~FLAG_ZSTD:
            raise Corrupt(f"{self.path}: unknown flags {flags:#x} at byte {offset}")
        if flags & FLAG_ZSTD:
            payload = _inflate(payload, self.path, offset, FRAME_NAMES[kind])
        return Frame(kind, payload, offset), checksum, FRAME.size + length

    def frames(self) -> Iterator[Frame]:
        """Every frame up to the trailer, checked; the trailer last."""
        chain = xxhash.xxh3_64()
        count = 0
        offset = PREFIX.size
        end = self.size - FOOTER.size
        while True:
            frame, checksum, disk_len = self._read_frame(offset, end)
            offset += disk_len
            if frame.kind == TRAILER:
                if frame.offset != self.trailer_offset:
                    raise Corrupt(f"{self.path}: a trailer in the middle of the file")
                trailer = _parse(file_pb2.FileTrailer(), frame.payload, "trailer", self.path)
                if trailer.records != count or trailer.chain_hash != chain.intdigest():
                    raise Corrupt(f"{self.path}: records are missing or out of order "
                                  f"({count} read, trailer says {trailer.records})")
                yield frame
                return
            if count == 0 and frame.kind != HEADER:
                raise Corrupt(f"{self.path}: the first record is not a header")
            chain.update(checksum.to_bytes(8, "little"))
            count += 1
            if frame.kind == MEMORY_IMAGE:
                image = _parse(file_pb2.MemoryImage(), frame.payload, "memory image", self.path)
                if (image.offset % MEMORY_ALIGN or image.offset < offset
                        or image.offset + image.length > end):
                    raise Corrupt(f"{self.path}: the memory image lies outside the file")
                offset = image.offset + image.length        # the frames go on after it
            yield frame
            if offset >= end:
                raise Truncated(f"{self.path} is truncated (no trailer)")

    def header(self) -> file_pb2.FileHeader:
        frame, _, _ = self._read_frame(PREFIX.size, self.size - FOOTER.size)
        if frame.kind != HEADER:
            raise Corrupt(f"{self.path}: the first record is not a header")
        return _parse(file_pb2.FileHeader(), frame.payload, "header", self.path)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _inflate(payload: bytes, path: Path, offset: int, what: str) -> bytes:
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError:
        raise Corrupt(f"{path}: the {what} record at byte {offset} is not valid zstd") from None
    if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and \
            params.content_size > MAX_INFLATED:
        raise Corrupt(f"{path}: the {what} record at byte {offset} claims to inflate to "
                      f"{params.content_size} bytes (a decompression bomb?)")
    try:
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=MAX_INFLATED)
    except zstandard.ZstdError as e:
        raise Corrupt(f"{path}: the {what} record at byte {offset} does not decompress "
                      f"within {MAX_INFLATED} bytes: {e}") from None


def check_readable(header: file_pb2.FileHeader, state_versions: tuple[int, int],
                   features: tuple[str, ...], path: Path) -> None:
    """Refuse, before anything is restored, what this build cannot honour."""
    lo, hi = state_versions
    if header.state_version > hi:
        raise Unsupported(f"{path} holds state version {header.state_version} "
                          f"(written by {header.producer}); this vmigrate reads state "
                          f"versions {lo}-{hi}: upgrade vmigrate to restore it")
    if header.state_version < lo:
        raise Unsupported(f"{path} holds state version {header.state_version} "
                          f"(written by {header.producer}); this vmigrate reads state "
                          f"versions {lo}-{hi}")
    missing = [f for f in header.required_features if f not in features]
    if missing:
        raise Unsupported(f"{path} needs features this vmigrate lacks: {', '.join(missing)} "
                          f"(written by {header.producer})")


def load(path: Path, with_memory: bool = False) -> tuple[Snapshot, list[file_pb2.MemoryRecord]]:
    """Read and check a whole file; memory records only when asked."""
    memory: list[file_pb2.MemoryRecord] = []
    with SnapshotReader(path) as r:
        counts: dict[str, int] = {}
        header = file_pb2.FileHeader()
        trailer = file_pb2.FileTrailer()
        descriptors = console = page_index = b""
        state = None
        image: tuple[int, int] | None = None
        for frame in r.frames():
            name = FRAME_NAMES[frame.kind]
            counts[name] = counts.get(name, 0) + 1
            if frame.kind == HEADER:
                if counts[name] > 1:
                    raise Corrupt(f"{path}: two headers")
                _parse(header, frame.payload, "header", path)
            elif frame.kind == DESCRIPTORS:
                descriptors = frame.payload
            elif frame.kind == STATE:
                state = frame.payload
            elif frame.kind == MEMORY:
                if with_memory:
                    memory.append(_parse(file_pb2.MemoryRecord(), frame.payload, "memory", path))
            elif frame.kind == PAGE_INDEX:
                page_index = _parse(file_pb2.PageIndex(), frame.payload, "page index",
                                    path).hashes
            elif frame.kind == CONSOLE:
                console = _parse(file_pb2.ConsoleRecord(), frame.payload, "console", path).data
            elif frame.kind == MEMORY_IMAGE:
                if image is not None:
                    raise Corrupt(f"{path}: two memory images")
                m = _parse(file_pb2.MemoryImage(), frame.payload, "memory image", path)
                image = (m.offset, m.length)
            elif frame.kind == TRAILER:
                _parse(trailer, frame.payload, "trailer", path)
        if state is None:
            raise Corrupt(f"{path} has no VM state record")
        if image is not None and (image[1] != header.memory_bytes
                                  or len(page_index) != image[1] // 4096 * 8):
            raise Corrupt(f"{path}: the memory image and its page index do not match "
                          "the guest's memory size")
        snap = Snapshot(path=path, header=header, trailer=trailer, size=r.size,
                        descriptors=descriptors, image=image, state_bytes=state,
                        console=console, page_index=page_index, frame_counts=counts)
        return snap, memory
