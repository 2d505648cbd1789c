"""Guest pages as MemoryChunks: choosing, encoding, checking and applying them.

Both the checkpoint file and the migration stream carry memory this way. A
chunk is a run of pages at one guest-physical address: ZERO (no data), RAW, or
ZSTD, with an xxh3_64 of the uncompressed pages. The decoder treats every
chunk as hostile: sizes are bounded before anything is allocated,
decompression is capped at the chunk's own size, addresses are checked
against the guest's memory layout, and the checksum is verified before a byte
reaches guest memory.

Inside the VMM memory is one file; a chunk's address is guest-physical, so the
two are translated through the layout (regions never share a chunk).
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import xxhash
import zstandard

from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm.pagehash import ZERO_PAGE_HASH, first_mismatch, page_hashes  # noqa: F401

PAGE = 4096
MAX_CHUNK_PAGES = 256              # 1 MiB: the sweet spot for gRPC and zstd here
BATCH_BYTES = 1 << 20
# Chunks per batch (one page frame): keeps a frame's header far below the
# receiver's 1 MiB limit even when dirty pages are scattered one by one.
BATCH_CHUNKS = 4096
ZSTD_LEVEL = -1                    # cheapest useful level on these machines (PERF-NOTES)
COMPRESS_KEEP_RATIO = 0.9          # keep a compressed chunk only if it saves 10 %

ZERO, RAW, ZSTD = pb.MemoryChunk.ZERO, pb.MemoryChunk.RAW, pb.MemoryChunk.ZSTD

_libc = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


class BadChunk(Exception):
    """A chunk that must not be applied: what is wrong, in one line."""


@dataclass
class Layout:
    """Guest-physical regions and where they live in the memory file."""

    regions: list[tuple[int, int, int]]     # (guest_phys_addr, size, file_offset)

    @classmethod
    def from_msg(cls, m: pb.MemoryLayout) -> Layout:
        return cls([(r.guest_phys_addr, r.size, r.file_offset) for r in m.regions])

    @property
    def size(self) -> int:
        return sum(size for _, size, _ in self.regions)

    @property
    def pages(self) -> int:
        return self.size // PAGE

    def offset_of(self, gpa: int, length: int) -> int:
        for base, size, off in self.regions:
            if base <= gpa and gpa + length <= base + size:
                return off + (gpa - base)
        raise BadChunk(f"pages {gpa:#x}..{gpa + length:#x} lie outside guest memory")

    def gpa_of(self, offset: int) -> int:
        for base, size, off in self.regions:
            if off <= offset < off + size:
                return base + (offset - off)
        raise ValueError(f"file offset {offset:#x} is not guest memory")

    def region_ends(self) -> list[int]:
        """File page numbers where a region ends (chunks must not cross them)."""
        return sorted((off + size) // PAGE for _, size, off in self.regions)


@dataclass(slots=True)
class Chunk:
    """A run of pages as encoded, before it becomes a message or a frame.

    A RAW chunk's `data` is a live view of guest memory and its checksum is 0
    until it is frozen: the guest may write the pages while they are being
    sent, so the checksum must be taken over the very bytes that leave (a page
    changed meanwhile is dirty and goes again in the next round)."""

    gpa: int
    pages: int
    encoding: int
    checksum: int = 0
    data: bytes | memoryview = b""

    def to_msg(self) -> pb.MemoryChunk:
        """A message holding a frozen copy of the pages."""
        data = bytes(self.data)
        checksum = xxhash.xxh3_64_intdigest(data) if self.encoding == RAW else self.checksum
        return pb.MemoryChunk(guest_phys_addr=self.gpa, page_count=self.pages,
                              encoding=self.encoding, checksum=checksum, data=data)

    @classmethod
    def from_msg(cls, m: pb.MemoryChunk) -> Chunk:
        return cls(m.guest_phys_addr, m.page_count, m.encoding, m.checksum, m.data)


@dataclass
class Counts:
    pages_zero: int = 0
    pages_raw: int = 0
    pages_compressed: int = 0
    bytes_out: int = 0            # encoded bytes (what goes on the wire / into the file)
    chunks: int = 0

    @property
    def pages(self) -> int:
        return self.pages_zero + self.pages_raw + self.pages_compressed

    def add(self, other: Counts) -> None:
        self.pages_zero += other.pages_zero
        self.pages_raw += other.pages_raw
        self.pages_compressed += other.pages_compressed
        self.bytes_out += other.bytes_out
        self.chunks += other.chunks


# ---------------------------------------------------------------- which pages


def bitmap_from_ranges(ranges: list[tuple[int, int]], pages: int) -> np.ndarray:
    """A page bitmap (uint64 words) with the pages of byte ranges set."""
    bits = np.zeros(((pages + 63) // 64) * 64, dtype=np.uint8)
    for off, length in ranges:
        first = off // PAGE
        last = min(pages, (off + length + PAGE - 1) // PAGE)
        bits[first:last] = 1
    return np.packbits(bits, bitorder="little").view(np.uint64)


def count_pages(bitmap: np.ndarray) -> int:
    return int(np.bitwise_count(bitmap).sum())


def runs(bitmap: np.ndarray, pages: int, breaks: list[int],
         max_pages: int = MAX_CHUNK_PAGES) -> Iterator[tuple[int, int]]:
    """(first page, count) runs of set bits, split at `breaks` and at max_pages.

    Only the nonzero words are unpacked, so a sparse bitmap (the last round of
    a migration: a few dirty pages in gigabytes) costs next to nothing."""
    words = np.flatnonzero(bitmap)
    if len(words) == 0:
        return
    bits = np.unpackbits(bitmap[words].view(np.uint8), bitorder="little").reshape(-1, 64)
    set_pages = (words[:, None] * 64 + np.arange(64))[bits.astype(bool)]
    set_pages = set_pages[set_pages < pages]
    if len(set_pages) == 0:
        return
    cut = np.flatnonzero(np.diff(set_pages) != 1) + 1
    starts = set_pages[np.concatenate(([0], cut))]
    ends = set_pages[np.concatenate((cut - 1, [len(set_pages) - 1]))] + 1
    cuts = [b for b in breaks if 0 < b < pages]
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        pos = s
        while pos < e:
            stop = min(e, pos + max_pages)
            for c in cuts:
                if pos < c < stop:
                    stop = c
                    break
            yield pos, stop - pos
            pos = stop


# ---------------------------------------------------------------- encoding


class Encoder:
    """Turns runs of pages of a mapped memory file into chunks."""

    def __init__(self, memory: mmap.mmap, layout: Layout, compress: bool,
                 level: int = ZSTD_LEVEL) -> None:
        self.memory = memory
        self.layout = layout
        self.compress = compress
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._view = np.frombuffer(memory, dtype=np.uint64)
        self._mv = memoryview(memory)

    def close(self) -> None:
        """Drop the views of guest memory (so the mapping can be closed)."""
        self._mv.release()
        self._view = None  # type: ignore[assignment]

    def encode_run(self, first_page: int, count: int, counts: Counts,
                   skip_zero: bool = False,
                   hashes: np.ndarray | None = None) -> list[Chunk]:
        """Chunks for pages [first_page, first_page+count) of the memory file.

        Zero pages become ZERO chunks (or nothing with skip_zero, when the
        receiver's memory is known to be all zero already). With `hashes`,
        each page's xxh3_64 is recorded there (the checkpoint page index).
        """
        words = self._view[first_page * 512:(first_page + count) * 512].reshape(count, 512)
        nonzero = words.any(axis=1)
        if hashes is not None:
            hashes[first_page:first_page + count] = page_hashes(self.memory, first_page, count,
                                                                nonzero)
        out: list[Chunk] = []
        edges = np.flatnonzero(np.diff(nonzero.astype(np.int8))) + 1
        bounds = [0, *edges.tolist(), count]
        for a, b in itertools.pairwise(bounds):
            n = b - a
            page = first_page + a
            gpa = self.layout.gpa_of(page * PAGE)
            if not nonzero[a]:
                counts.pages_zero += n
                if not skip_zero:
                    out.append(Chunk(gpa, n, ZERO))
                    counts.bytes_out += 16
                    counts.chunks += 1
                continue
            view = self._mv[page * PAGE:(page + n) * PAGE]
            if self.compress:
                raw = bytes(view)          # a stable copy: checksum and compress the same bytes
                packed = self._cctx.compress(raw)
                if len(packed) < len(raw) * COMPRESS_KEEP_RATIO:
                    out.append(Chunk(gpa, n, ZSTD, xxhash.xxh3_64_intdigest(raw), packed))
                    counts.pages_compressed += n
                    counts.bytes_out += len(packed) + 24
                    counts.chunks += 1
                    continue
            out.append(Chunk(gpa, n, RAW, 0, view))
            counts.pages_raw += n
            counts.bytes_out += len(view) + 24
            counts.chunks += 1
        return out

    def batches(self, bitmap: np.ndarray, counts: Counts, skip_zero: bool = False,
                batch_bytes: int = BATCH_BYTES,
                hashes: np.ndarray | None = None) -> Iterator[list[Chunk]]:
        """Every set page of `bitmap`, as batches of chunks of about batch_bytes."""
        batch: list[Chunk] = []
        size = 0
        for first, count in runs(bitmap, self.layout.pages, self.layout.region_ends()):
            for chunk in self.encode_run(first, count, counts, skip_zero, hashes):
                batch.append(chunk)
                size += len(chunk.data) + 16
                if size >= batch_bytes or len(batch) >= BATCH_CHUNKS:
                    yield batch
                    batch, size = [], 0
        if batch:
            yield batch




# ---------------------------------------------------------------- decoding


@dataclass
class Decoder:
    """Checks chunks and writes them into a mapped memory file.

    `fresh` says the memory is still all zero (nothing written yet), so ZERO
    chunks need no work; otherwise their pages are dropped from the file
    (a hole reads as zero and costs no memory).
    """

    memory: mmap.mmap
    layout: Layout
    fd: int | None = None
    fresh: bool = True
    counts: Counts = field(default_factory=Counts)

    def __post_init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))

    def check(self, c: Chunk) -> tuple[int, int]:
        """Validate a chunk's address and size; returns (file offset, length)."""
        n = c.pages
        if n <= 0 or n > MAX_CHUNK_PAGES * 4:
            raise BadChunk(f"chunk at {c.gpa:#x} claims {n} pages")
        if c.gpa % PAGE:
            raise BadChunk(f"chunk address {c.gpa:#x} is not page-aligned")
        length = n * PAGE
        return self.layout.offset_of(c.gpa, length), length

    def decode(self, c: Chunk, length: int) -> bytes | memoryview | None:
        """The chunk's pages (None for ZERO), checked against its checksum."""
        if c.encoding == ZERO:
            if len(c.data):
                raise BadChunk(f"zero chunk at {c.gpa:#x} carries data")
            return None
        if c.encoding == RAW:
            data = c.data
            if len(data) != length:
                raise BadChunk(f"raw chunk at {c.gpa:#x} has {len(data)} bytes, "
                               f"expected {length}")
        elif c.encoding == ZSTD:
            if len(c.data) > length + 1024:
                raise BadChunk(f"compressed chunk at {c.gpa:#x} is larger than its pages")
            try:
                # python-zstandard allocates what a frame header claims and
                # ignores max_output_size then: check the claim first.
                claimed = zstandard.get_frame_parameters(c.data).content_size
                if claimed not in (length, zstandard.CONTENTSIZE_UNKNOWN):
                    raise BadChunk(f"chunk at {c.gpa:#x} claims to inflate to {claimed} "
                                   f"bytes, expected {length}")
                data = self._dctx.decompress(c.data, max_output_size=length)
            except zstandard.ZstdError as e:
                raise BadChunk(f"chunk at {c.gpa:#x} does not decompress: {e}") from None
            if len(data) != length:
                raise BadChunk(f"chunk at {c.gpa:#x} decompresses to {len(data)} "
                               f"bytes, expected {length}")
        else:
            raise BadChunk(f"chunk at {c.gpa:#x} has unknown encoding {c.encoding}")
        if xxhash.xxh3_64_intdigest(data) != c.checksum:
            raise BadChunk(f"checksum mismatch in the chunk at {c.gpa:#x} "
                           f"({c.pages} pages): the data was damaged")
        return data

    def apply(self, c: Chunk | pb.MemoryChunk) -> None:
        if isinstance(c, pb.MemoryChunk):
            c = Chunk.from_msg(c)
        off, length = self.check(c)
        data = self.decode(c, length)
        if data is None:
            self.counts.pages_zero += c.pages
            if not self.fresh:
                self._zero(off, length)
        else:
            self.memory[off:off + length] = data
            if c.encoding == ZSTD:
                self.counts.pages_compressed += c.pages
            else:
                self.counts.pages_raw += c.pages
        self.counts.bytes_out += len(c.data)
        self.counts.chunks += 1

    def _zero(self, off: int, length: int) -> None:
        if self.fd is not None:
            r = _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                ctypes.c_long(off), ctypes.c_long(length))
            if r == 0:
                return
        ctypes.memset(self._base + off, 0, length)

    def close(self) -> None:
        self._base = 0
