"""Fuzzing the two readers of hostile bytes, with a bounded budget for CI.

- the checkpoint reader: migrate/snapfile.py and the restore path up to
  putting memory in place (migrate/checkpoint.py: load_chain, decode_state,
  the layout checks _restore makes, apply_memory / copy_image), and
  `vmigrate inspect`, which decodes the state with the schema the file itself
  carries;
- the migration stream receiver: pagestream.decode + pages.Decoder in this
  process, and a real agent's /vmigrate.v1.PageStream/Push endpoint.

hypothesis generates the inputs: garbage, structurally valid inputs with one
thing wrong (checksums recomputed, so the fuzzer gets past them), and byte
mutations of valid ones. The budget is fixed and derandomized, so CI sees the
same inputs every run (VMIGRATE_FUZZ_EXAMPLES=N runs more, and
VMIGRATE_FUZZ_RANDOM=1 draws new ones each run). Every input must
end in success or in the documented error (BadFrame/BadChunk for the stream;
SnapshotError for files, InspectError for inspect; a gRPC status other than
INTERNAL/UNKNOWN from the agent) within a few seconds (SIGALRM) and without
allocating more than a bounded amount (RLIMIT_AS lowered around each input;
the agent's peak RSS measured). A decoder that accepts input must have written
exactly what the accepted chunks vouched for, nothing else.

tests/fuzz_corpus/<target>/*.zst keeps inputs found earlier (the smallest
input for each distinct way of being rejected, and any that once broke
something); every run replays them. VMIGRATE_FUZZ_SAVE=1 adds new ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
import re
import resource
import shutil
import signal
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import xxhash
import zstandard
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmigrate.migrate import checkpoint, inspect, pagestream, snapfile, versions
from vmigrate.migrate.pages import PAGE, RAW, ZERO, ZSTD, BadChunk, Chunk, Decoder, Layout
from vmigrate.proto import agent_pb2, agent_pb2_grpc, file_pb2
from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm.memory import default_layout

CORPUS = Path(__file__).parent / "fuzz_corpus"
EXAMPLES = int(os.environ.get("VMIGRATE_FUZZ_EXAMPLES", "0")) or None
SAVE = os.environ.get("VMIGRATE_FUZZ_SAVE") == "1"
RANDOM = os.environ.get("VMIGRATE_FUZZ_RANDOM") == "1"    # local hunts: new inputs every run
TIME_LIMIT_S = 5.0              # per input
# Address space one input may add before its allocation counts as unbounded:
# a page frame's chunk is at most 4 MiB of pages, so 96 MiB is generous; a
# checkpoint record may legitimately inflate to snapfile.MAX_INFLATED (64 MiB).
# (Some room is left for whatever else the test process allocates meanwhile.)
STREAM_HEADROOM = 96 << 20
FILE_HEADROOM = 2 * snapfile.MAX_INFLATED
MEMORY_HEADROOM = 1 << 30
HARNESS_MAX_MEMORY = 64 << 20   # guest sizes the restore harness will map


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=EXAMPLES or examples, deadline=None, derandomize=not RANDOM,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- bounds


class Hang(Exception):
    """An input took longer than TIME_LIMIT_S."""


class Short(bytes):
    """Input bytes that print as their length and hash, not 100 KiB of repr."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes sha1 {hashlib.sha1(self).hexdigest()[:12]}>"


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def bounded(seconds: float = TIME_LIMIT_S, headroom: int = MEMORY_HEADROOM) -> Iterator[None]:
    """No hang (SIGALRM raises Hang) and no unbounded allocation (the address
    space may grow by `headroom`; beyond it allocations fail with MemoryError)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)

    def alarm(_sig: int, _frame: object) -> None:
        raise Hang(f"no answer within {seconds}s")
    old = signal.signal(signal.SIGALRM, alarm)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_bounds_catch_hangs_and_hungry_inputs():
    with pytest.raises(Hang), bounded(0.2):
        time.sleep(2)
    with pytest.raises(MemoryError), bounded(headroom=64 << 20):
        bytearray(256 << 20)
    bytearray(256 << 20)            # and the limit is lifted afterwards


# ---------------------------------------------------------------- the corpus


def _outcome(e: BaseException | None) -> str:
    """An input's outcome class: exception type and message without numbers/paths."""
    if e is None:
        return "accepted"
    msg = re.sub(r"/[^\s:]*", "PATH", str(e))
    msg = re.sub(r"0x[0-9a-f]+|\b\d+\b", "N", msg)
    return f"{type(e).__name__}: {msg[:80]}"


class Corpus:
    """Inputs kept under tests/fuzz_corpus/<target>/, zstd-compressed."""

    def __init__(self, target: str) -> None:
        self.dir = CORPUS / target
        self.found: dict[str, bytes] = {}

    def inputs(self) -> list[Path]:
        return sorted(self.dir.glob("*.zst")) if self.dir.is_dir() else []

    @staticmethod
    def read(path: Path) -> bytes:
        return zstandard.ZstdDecompressor().decompress(path.read_bytes(),
                                                       max_output_size=64 << 20)

    def note(self, data: bytes, outcome: str) -> None:
        if SAVE and (outcome not in self.found or len(data) < len(self.found[outcome])):
            self.found[outcome] = data

    def save(self) -> None:
        if not SAVE:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        known = {p.name for p in self.inputs()}
        index = {}
        for outcome, data in sorted(self.found.items()):
            name = hashlib.sha1(data).hexdigest()[:16] + ".zst"
            index[name] = outcome
            if name not in known:
                (self.dir / name).write_bytes(zstandard.ZstdCompressor(level=19).compress(data))
        readme = self.dir / "outcomes.json"
        old = json.loads(readme.read_text()) if readme.exists() else {}
        readme.write_text(json.dumps({**old, **index}, indent=1, sort_keys=True) + "\n")


CORPORA = {name: Corpus(name) for name in ("pageframe", "checkpoint")}


@contextlib.contextmanager
def noted(target: str, data: bytes, prefix: str = "") -> Iterator[Callable[[str], None]]:
    """Record the input's outcome for the corpus, a failure's too."""
    outcome = ["?"]

    def note(o: str) -> None:
        outcome[0] = o
    try:
        yield note
    except BaseException as e:
        outcome[0] = f"FAILED {_outcome(e)}"
        raise
    finally:
        CORPORA[target].note(bytes(data), prefix + outcome[0])


@pytest.fixture(scope="module", autouse=True)
def _save_corpora() -> Iterator[None]:
    yield
    for c in CORPORA.values():
        c.save()


# ---------------------------------------------------------------- strategies: chunks and frames

# The stream target's guest: 16 pages in two regions with a hole between them.
STREAM_LAYOUT = Layout([(0, 8 * PAGE, 0), (16 * PAGE, 8 * PAGE, 8 * PAGE)])

GPAS = st.one_of(
    st.sampled_from([0, PAGE, 7 * PAGE, 8 * PAGE, 15 * PAGE, 16 * PAGE, 23 * PAGE, 24 * PAGE,
                     1, PAGE - 1, 1 << 40, 2**64 - PAGE, 2**64 - 1]),
    st.integers(0, 32).map(lambda p: p * PAGE),
    st.integers(0, 2**64 - 1))
VALID_GPAS = st.integers(0, 4).map(lambda p: p * PAGE)     # + 4 pages: inside both layouts
PAGE_COUNTS = st.one_of(st.integers(0, 9), st.sampled_from(
    [16, 255, 256, 1024, 1025, 1 << 20, 10**9, 2**32 - 1]))
ENCODINGS = st.one_of(st.sampled_from([ZERO, RAW, ZSTD]), st.sampled_from([0, 4, 7, 2**31 - 1]))
# Two kinds of zstd bomb small enough to pass a "no larger than its pages"
# check: 150 MiB of zeros in ~4.8 KB, and 17 bytes whose header claims 4 GiB.
BOMB = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(150 << 20))
CLAIMS_4GIB = (b"\x28\xb5\x2f\xfd\xe0" + (4 << 30).to_bytes(8, "little")
               + ((PAGE << 3) | 0b011).to_bytes(3, "little") + b"\x07")


@st.composite
def chunk_specs(draw: st.DrawFn) -> tuple[int, int, int, int, bytes]:
    """(gpa, pages, encoding, checksum, data) of one chunk, usually almost valid."""
    gpa = draw(GPAS) if draw(st.integers(0, 4)) == 0 else draw(VALID_GPAS)
    n = draw(PAGE_COUNTS) if draw(st.integers(0, 4)) == 0 else draw(st.integers(1, 4))
    how = draw(st.sampled_from(["exact", "bomb", "exact", "claims-4gib", "exact", "lying-zstd",
                                "short", "long", "garbage", "empty"]))
    zstd_data = how in ("bomb", "claims-4gib", "lying-zstd")
    enc = draw(st.one_of(st.just(ZSTD), st.just(ZSTD), ENCODINGS) if zstd_data else ENCODINGS)
    size = n * PAGE if n <= 16 else PAGE
    seed = draw(st.binary(min_size=1, max_size=32))
    pages_ = (seed * (size // len(seed) + 1))[:size]
    if how == "exact":
        data = zstandard.ZstdCompressor(level=1).compress(pages_) if enc == ZSTD else \
            b"" if enc == ZERO else pages_
    elif how == "short":
        data = pages_[:-1]
    elif how == "long":
        data = pages_ + b"\0"
    elif how == "garbage":
        data = draw(st.binary(max_size=64))
    elif how == "empty":
        data = b""
    elif how == "bomb":
        data = BOMB
    elif how == "claims-4gib":
        data = CLAIMS_4GIB
    else:
        data = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 * PAGE))
    right = xxhash.xxh3_64_intdigest(pages_) if enc != ZERO else 0
    checksum = draw(st.one_of(st.just(right), st.just(right), st.integers(0, 2**64 - 1)))
    return gpa, n, enc, checksum, data


def build_frame(mid: str, round_: int, chunks: list[tuple[int, int, int, int, bytes]],
                tamper: dict[str, int]) -> bytes:
    """A page frame as pagestream.encode makes it, but with every field ours."""
    heads = [agent_pb2.ChunkHeader(guest_phys_addr=g, page_count=min(n, 2**32 - 1),
                                   encoding=e, checksum=c, data_length=len(d))
             for g, n, e, c, d in chunks]
    if "data_length" in tamper and heads:
        heads[0].data_length = tamper["data_length"]
    head = agent_pb2.PageFrameHeader(migration_id=mid, round=round_,
                                     chunks=heads).SerializeToString()
    prefix = pagestream.PREFIX.pack(
        b"VMPX" if tamper.get("magic") else pagestream.MAGIC,
        tamper.get("version", pagestream.VERSION), tamper.get("flags", 0),
        tamper.get("head_len", len(head)))
    return prefix + head + b"".join(d for *_, d in chunks)


TAMPER = st.one_of(
    st.just({}), st.just({}), st.just({}),
    st.fixed_dictionaries({}, optional={
        "magic": st.just(1), "version": st.sampled_from([0, 2, 65535]),
        "flags": st.sampled_from([1, 0x8000]),
        "head_len": st.sampled_from([0, 1, 2**20, 2**20 + 1, 2**32 - 1]),
        "data_length": st.sampled_from([0, 1, 2**31, 2**32 - 1])}))


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """A few byte-level edits: flips, truncation, insertion, duplication."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "flip", "cut", "insert", "dup"]))
        if not buf:
            break
        pos = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            end = min(len(buf), pos + draw(st.integers(1, 64)))
            buf[pos:pos] = buf[pos:end]
    return bytes(buf)


@st.composite
def frame_specs(draw: st.DrawFn) -> tuple[str, int, list, dict, int]:
    """What build_frame needs, with the migration id left to the caller
    ("{mid}" means the migration under test)."""
    mid = draw(st.sampled_from(["{mid}", "{mid}", "{mid}", "", "x" * 16, "\u00e9" * 8]))
    round_ = draw(st.sampled_from([0, 0, 1, 2, 2**32 - 1]))
    chunks = draw(st.lists(chunk_specs(), max_size=5))
    return mid, round_, chunks, draw(TAMPER), draw(st.integers(0, 2**32 - 1))


def render(spec: tuple[str, int, list, dict, int], mid: str) -> bytes:
    m, round_, chunks, tamper, _ = spec
    return build_frame(mid if m == "{mid}" else m, round_, chunks, tamper)


_SPEC = frame_specs().map(lambda s: render(s, "0123456789abcdef"))
FRAMES = st.one_of(st.binary(max_size=256), _SPEC, _SPEC, _SPEC, _SPEC.flatmap(mutations))


# ---------------------------------------------------------------- target: the stream receiver


def receive(frame: bytes) -> str:
    """pagestream.decode + pages.Decoder into fresh memory, as the agent's
    receive_memory does; checks memory holds exactly what accepted chunks
    vouched for. Returns the outcome class."""
    size = STREAM_LAYOUT.size
    mem = mmap.mmap(-1, size)
    model = bytearray(size)
    error: BaseException | None = None
    try:
        header, chunks = pagestream.decode(frame)
        dec = Decoder(mem, STREAM_LAYOUT, fd=None, fresh=header.round == 0)
        for c in chunks:
            dec.apply(c)
            off = STREAM_LAYOUT.offset_of(c.gpa, c.pages * PAGE)
            n = c.pages * PAGE
            if c.encoding == RAW:
                model[off:off + n] = bytes(c.data)
            elif c.encoding == ZSTD:
                model[off:off + n] = zstandard.ZstdDecompressor().decompress(
                    bytes(c.data), max_output_size=n)
            elif header.round != 0:
                # Round 0 goes to fresh (all-zero) memory, so its ZERO chunks
                # are no-ops by design (docs/protocol.md, "holes are skipped").
                model[off:off + n] = bytes(n)
        dec.close()
    except (pagestream.BadFrame, BadChunk) as e:
        error = e
    try:
        assert mem[:] == bytes(model), "guest memory holds bytes no accepted chunk vouched for"
    finally:
        mem.close()
    return _outcome(error)


@fuzz_settings(400)
@given(FRAMES.map(Short))
def test_fuzz_stream_receiver(frame):
    with noted("pageframe", frame) as note, bounded(headroom=STREAM_HEADROOM):
        note(receive(frame))


def test_valid_frames_are_applied_exactly():
    """The model check above is not vacuous: real frames are accepted."""
    data = bytes(range(256)) * 16
    chunks = [(PAGE, 1, RAW, xxhash.xxh3_64_intdigest(data), data),
              (16 * PAGE, 1, ZSTD, xxhash.xxh3_64_intdigest(data),
               zstandard.ZstdCompressor().compress(data)),
              (0, 1, ZERO, 0, b"")]
    assert receive(build_frame("m", 1, chunks, {})) == "accepted"


@pytest.mark.parametrize("path", CORPORA["pageframe"].inputs(), ids=lambda p: p.stem)
def test_stream_corpus(path):
    with bounded(headroom=STREAM_HEADROOM):
        receive(Corpus.read(path))


# ---------------------------------------------------------------- target: checkpoint files

MEMORY = 16 * PAGE            # the fuzzed files' guest


def _state() -> pb.VmState:
    regions = [pb.MemoryRegion(guest_phys_addr=r.guest_phys_addr, size=r.size,
                               file_offset=r.file_offset) for r in default_layout(MEMORY)]
    return pb.VmState(state_version=versions.STATE_VERSION_MAX,
                      config=pb.VmConfig(name="fz", memory_bytes=MEMORY, vcpu_count=1,
                                         test_guest=pb.TestGuestConfig()),
                      memory=pb.MemoryLayout(page_size=PAGE, regions=regions),
                      vcpus=[pb.VcpuState()])


def _pages(seed: int, n: int) -> bytes:
    return (bytes([seed]) + bytes(range(255))) * 16 * n


def _header(**kw: object) -> file_pb2.FileHeader:
    return file_pb2.FileHeader(producer="vmigrate fuzz", state_version=versions.STATE_VERSION_MAX,
                               vm="fz", memory_bytes=MEMORY, **kw)


def write_records_file(path: Path, parent: snapfile.Snapshot | None = None) -> None:
    """A small, valid, records-layout checkpoint (or an incremental child)."""
    header = _header()
    if parent is not None:
        header.parent_path = parent.path.name
        header.parent_id = parent.header.file_id
    w = snapfile.SnapshotWriter(path, header)
    raw = _pages(1, 2)
    w.write_memory(0, [
        pb.MemoryChunk(guest_phys_addr=0, page_count=2, encoding=RAW, data=raw,
                       checksum=xxhash.xxh3_64_intdigest(raw)),
        pb.MemoryChunk(guest_phys_addr=4 * PAGE, page_count=4, encoding=ZSTD,
                       data=zstandard.ZstdCompressor().compress(_pages(2, 4)),
                       checksum=xxhash.xxh3_64_intdigest(_pages(2, 4))),
        pb.MemoryChunk(guest_phys_addr=8 * PAGE, page_count=3, encoding=ZERO)])
    one = _pages(3, 1)
    w.write_memory(1, [pb.MemoryChunk(guest_phys_addr=PAGE, page_count=1, encoding=RAW,
                                      data=one, checksum=xxhash.xxh3_64_intdigest(one))])
    w.write_state(_state())
    w.write_page_index(bytes(8 * (MEMORY // PAGE)))
    w.write_console(b"HB cpu=0 n=1\n")
    w.finish(file_pb2.FileTrailer(rounds=2))


def write_mapped_file(path: Path) -> None:
    """A small, valid, mapped-layout checkpoint: memory as an image plus page index."""
    header = _header(mapped_memory=True)
    w = snapfile.SnapshotWriter(path, header)
    w.begin_image(MEMORY)
    hashes = []
    for i in range(MEMORY // PAGE):
        page = _pages(i, 1) if i % 3 else bytes(PAGE)
        if i % 3:
            w.write_image(i * PAGE, page)
        hashes.append(xxhash.xxh3_64_intdigest(page))
    w.write_state(_state())
    w.write_page_index(struct.pack(f"<{len(hashes)}Q", *hashes))
    w.write_console(b"")
    w.finish(file_pb2.FileTrailer(rounds=1))


_BASES: dict[str, bytes] = {}


def bases() -> dict[str, bytes]:
    """Valid files to start from: records layout, its incremental child, mapped
    layout (made once; a module global so hypothesis does not print them)."""
    if not _BASES:
        d = Path(tempfile.mkdtemp(prefix="vmfb"))
        try:
            write_records_file(d / "base.ckpt")
            parent, _ = snapfile.load(d / "base.ckpt")
            write_records_file(d / "child.ckpt", parent)
            write_mapped_file(d / "mapped.ckpt")
            out = {n: (d / f"{n}.ckpt").read_bytes() for n in ("base", "child", "mapped")}
            for data in out.values():
                assert restore(out["base"], data, d) == "accepted"
            _BASES.update(out)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return _BASES


def frames_of(data: bytes) -> list[tuple[int, int, bytes]]:
    """(kind, flags, payload) of every frame before the trailer (records layout)."""
    out, off = [], snapfile.PREFIX.size
    end = len(data) - snapfile.FOOTER.size
    while off < end:
        kind, flags, _, length, _ = snapfile.FRAME.unpack_from(data, off)
        if kind == snapfile.TRAILER:
            break
        out.append((kind, flags, data[off + 16:off + 16 + length]))
        off += 16 + length
    return out


def reframe(frames: list[tuple[int, int, bytes]], trailer: file_pb2.FileTrailer | None = None,
            version: int = snapfile.FORMAT_VERSION, footer_delta: int = 0) -> bytes:
    """A file around `frames` with right checksums, chain, trailer and footer."""
    buf = bytearray(snapfile.PREFIX.pack(snapfile.MAGIC, version, 0))
    chain = xxhash.xxh3_64()
    for kind, flags, payload in frames:
        cs = snapfile.frame_checksum(kind, flags, payload)
        buf += snapfile.FRAME.pack(kind, flags, 0, len(payload), cs) + payload
        chain.update(cs.to_bytes(8, "little"))
    if trailer is None:
        trailer = file_pb2.FileTrailer(records=len(frames), chain_hash=chain.intdigest())
    payload = trailer.SerializeToString()
    offset = len(buf)
    buf += snapfile.FRAME.pack(snapfile.TRAILER, 0, 0, len(payload),
                               snapfile.frame_checksum(snapfile.TRAILER, 0, payload)) + payload
    buf += snapfile.FOOTER.pack(snapfile.FOOTER_MAGIC, offset + footer_delta)
    return bytes(buf)


def _inflated(kind: int, flags: int, payload: bytes) -> bytes:
    if not flags & 1:
        return payload
    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    except zstandard.ZstdError:
        return payload


PARENTS = st.sampled_from(["", "base.ckpt", "child.ckpt", "input.ckpt", "missing.ckpt",
                           "/dev/null", "/dev/zero", "/proc/self/stat", ".", "/",
                           "../" * 40 + "etc/hostname"])


@st.composite
def edited_payload(draw: st.DrawFn, kind: int, payload: bytes, parent_ids: list[str]) -> bytes:
    """The frame's message with a field or two set to something awkward."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=128))
    try:
        return _edit_message(draw, kind, payload, parent_ids)
    except DecodeError:           # an earlier edit made it garbage already
        return draw(st.binary(max_size=128))


def _edit_message(draw: st.DrawFn, kind: int, payload: bytes, parent_ids: list[str]) -> bytes:
    if kind == snapfile.HEADER:
        h = file_pb2.FileHeader.FromString(payload)
        field = draw(st.sampled_from(["state_version", "memory_bytes", "required_features",
                                      "parent", "mapped", "vm"]))
        if field == "state_version":
            h.state_version = draw(st.sampled_from([0, 1, 2, 3, 99, 2**32 - 1]))
        elif field == "memory_bytes":
            h.memory_bytes = draw(st.sampled_from([0, 1, PAGE, MEMORY * 2, 2**63, 2**64 - 1]))
        elif field == "required_features":
            h.required_features.append(draw(st.sampled_from(["dev.rtc", "x" * 300, ""])))
        elif field == "parent":
            h.parent_path = draw(PARENTS)
            h.parent_id = draw(st.sampled_from(["", "nope", *parent_ids]))
        elif field == "mapped":
            h.mapped_memory = True
            h.memory_offset = draw(st.sampled_from([0, PAGE, 2**64 - PAGE]))
        else:
            h.vm = draw(st.sampled_from(["", "../x", "a" * 1000]))
        return h.SerializeToString()
    if kind == snapfile.MEMORY:
        rec = file_pb2.MemoryRecord(round=draw(st.sampled_from([0, 1, 2**32 - 1])))
        for g, n, e, c, d in draw(st.lists(chunk_specs(), min_size=1, max_size=4)):
            rec.chunks.append(pb.MemoryChunk(guest_phys_addr=g, page_count=min(n, 2**32 - 1),
                                             encoding=e, checksum=c, data=d))
        return rec.SerializeToString()
    if kind == snapfile.STATE:
        s = pb.VmState.FromString(payload)
        field = draw(st.sampled_from(["memory", "regions", "version", "vcpus"]))
        if field == "memory":
            s.config.memory_bytes = draw(st.sampled_from([0, PAGE, MEMORY * 2, 2**40, 2**64 - 1]))
        elif field == "regions":
            del s.memory.regions[:]
            for _ in range(draw(st.integers(0, 3))):
                s.memory.regions.add(guest_phys_addr=draw(GPAS),
                                     size=draw(st.sampled_from([0, PAGE, MEMORY, 2**64 - 1])),
                                     file_offset=draw(st.sampled_from([0, PAGE, 2**63])))
        elif field == "version":
            s.state_version = draw(st.sampled_from([0, 1, 2, 3, 2**32 - 1]))
        else:
            for _ in range(draw(st.integers(1, 3))):
                s.vcpus.add(id=draw(st.integers(0, 2**32 - 1)))
        return s.SerializeToString()
    if kind == snapfile.PAGE_INDEX:
        return file_pb2.PageIndex(hashes=draw(st.binary(max_size=200))).SerializeToString()
    return draw(st.binary(max_size=64))


@st.composite
def edited_file(draw: st.DrawFn) -> bytes:
    """A records-layout file with frames edited, dropped, repeated or
    reordered, re-framed with valid checksums, chain and footer."""
    b = bases()
    frames = frames_of(b[draw(st.sampled_from(["base", "child"]))])
    ids = [file_pb2.FileHeader.FromString(frames_of(b[n])[0][2]).file_id
           for n in ("base", "child")]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["edit", "edit", "edit", "drop", "dup", "swap", "kind",
                                   "flags", "compress"]))
        i = draw(st.integers(0, len(frames) - 1))
        kind, flags, payload = frames[i]
        if op == "edit":
            plain = _inflated(kind, flags, payload)
            new = draw(edited_payload(kind, plain, ids))
            frames[i] = (kind, flags, zstandard.ZstdCompressor().compress(new)
                         if flags & 1 else new)
        elif op == "drop" and len(frames) > 1:
            del frames[i]
        elif op == "dup":
            frames.insert(i, frames[i])
        elif op == "swap":
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        elif op == "kind":
            frames[i] = (draw(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 9, 0x7F, 0])), flags, payload)
        elif op == "flags":
            frames[i] = (kind, draw(st.sampled_from([0, 1, 2, 0x81])), payload)
        elif op == "compress":
            bomb = draw(st.booleans())
            body = bytes(80 << 20) if bomb else _inflated(kind, flags, payload)
            size = draw(st.booleans())
            frames[i] = (kind, 1, zstandard.ZstdCompressor(write_content_size=size)
                         .compress(body))
    trailer = None
    if draw(st.integers(0, 9)) == 0:
        trailer = file_pb2.FileTrailer(records=draw(st.sampled_from([0, len(frames) + 1])))
    return reframe(frames, trailer, version=draw(st.sampled_from([1, 1, 1, 0, 2])),
                   footer_delta=draw(st.sampled_from([0, 0, 0, 0, 16, -16, 1 << 40])))


def restore(base: bytes, data: bytes, d: Path) -> str:
    """What `vmigrate restore` does with a file up to and including putting its
    memory in place (no VMM: the layout is checked as the agent checks it).
    `base` is written beside it as base.ckpt (incremental inputs name it)."""
    for p in d.iterdir():
        if p.is_file():
            p.unlink()
    (d / "base.ckpt").write_bytes(base)
    path = d / "input.ckpt"
    path.write_bytes(data)
    error: BaseException | None = None
    try:
        chain = checkpoint.load_chain(path)
        state = checkpoint.decode_state(chain[-1])
        layout = Layout.from_msg(state.memory)
        size = state.config.memory_bytes
        if layout.size != size:
            return "refused: layout does not match the memory size"
        if not 0 < size <= HARNESS_MAX_MEMORY or size % PAGE:
            return "refused: the VMM would make (or refuse) this guest"
        if [tuple(r) for r in layout.regions] != \
                [(r.guest_phys_addr, r.size, r.file_offset) for r in default_layout(size)]:
            return "refused: laid out differently"
        memory = SimpleNamespace(map=mmap.mmap(-1, size), fd=None)
        try:
            if chain[-1].image is not None:
                if len(chain) > 1:
                    return "refused: mapped file in a chain"
                checkpoint.copy_image(chain[-1], memory)  # type: ignore[arg-type]
            else:
                checkpoint.apply_memory(chain, memory, layout)  # type: ignore[arg-type]
        finally:
            with contextlib.suppress(BufferError):    # as MappedMemory.close does
                memory.map.close()
    except snapfile.SnapshotError as e:
        error = e
    return _outcome(error)


def inspect_file(data: bytes, d: Path) -> str:
    """`vmigrate inspect FILE` and `--json --chunks`, output thrown away."""
    path = d / "inspect.ckpt"
    path.write_bytes(data)
    error: BaseException | None = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            inspect.main(path)
            inspect.main(path, as_json=True, show_chunks=True)
    except inspect.InspectError as e:
        error = e
    return _outcome(error)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vmfz", dir="/dev/shm" if os.path.isdir("/dev/shm")
                              else None))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


FILES = st.one_of(
    st.binary(max_size=128),
    edited_file(),
    edited_file().flatmap(mutations),
    st.sampled_from(["base", "child", "mapped"]).map(lambda n: bases()[n]).flatmap(mutations))


@fuzz_settings(250)
@given(FILES.map(Short))
def test_fuzz_checkpoint_restore(workdir, content):
    with noted("checkpoint", content) as note, bounded(headroom=FILE_HEADROOM):
        note(restore(bases()["base"], content, workdir))


@fuzz_settings(80)
@given(FILES.map(Short))
def test_fuzz_inspect(workdir, content):
    with noted("checkpoint", content, "inspect ") as note, bounded(headroom=FILE_HEADROOM):
        note(inspect_file(content, workdir))


@pytest.mark.parametrize("path", CORPORA["checkpoint"].inputs(), ids=lambda p: p.stem)
def test_checkpoint_corpus(workdir, path):
    content = Corpus.read(path)
    with bounded(headroom=FILE_HEADROOM):
        restore(bases()["base"], content, workdir)
    with bounded(headroom=FILE_HEADROOM):
        inspect_file(content, workdir)


def test_a_parent_that_is_not_a_regular_file_does_not_hang(workdir):
    """An incremental file names its parent; the reader opens whatever that
    is. A FIFO blocks open() forever (and a device may do worse than block):
    a parent must be a regular file, checked before it is opened."""
    fifo = workdir / "fifo"
    with contextlib.suppress(FileNotFoundError):
        fifo.unlink()
    os.mkfifo(fifo)
    frames = frames_of(bases()["child"])
    h = file_pb2.FileHeader.FromString(frames[0][2])
    h.parent_path = str(fifo)
    frames[0] = (frames[0][0], frames[0][1], h.SerializeToString())
    path = workdir / "child-of-fifo.ckpt"
    path.write_bytes(reframe(frames))
    try:
        with bounded(3.0), pytest.raises(snapfile.SnapshotError):
            checkpoint.load_chain(path)
    finally:
        fifo.unlink()


def test_checkpoint_file_that_is_a_fifo_does_not_hang(workdir):
    """`vmigrate restore FIFO` (or inspect): refused, not a hung agent."""
    fifo = workdir / "restore-me"
    os.mkfifo(fifo)
    try:
        with bounded(3.0), pytest.raises(snapfile.SnapshotError):
            snapfile.load(fifo)
    finally:
        fifo.unlink()


# ---------------------------------------------------------------- target: a real agent's endpoint


@pytest.fixture(scope="module")
def endpoint() -> Iterator[SimpleNamespace]:
    """A real agent (`vmigrate up --hosts 1`, mutual TLS) and a peer agent's
    certificate to push with."""
    from tests.cluster import LocalCluster
    from vmigrate.migrate import pki

    home = Path(tempfile.mkdtemp(prefix="vmfe", dir="/tmp"))
    c = LocalCluster(home, hosts=1)
    try:
        info = json.loads((home / "cluster" / "hosts" / "host1" / "agent.json").read_text())
        peer = pki.issue_certificate(home / "cluster" / "pki", "agent", "peer", home / "peer")
        ch = pki.connect(info["address"], peer, agent_name="host1")
        ns = SimpleNamespace(channel=ch, stub=agent_pb2_grpc.AgentStub(ch),
                             push=pagestream.push_callable(ch), pid=int(info["pid"]),
                             mid="", prepared=0)
        yield ns
        ch.close()
    finally:
        c.close()
        shutil.rmtree(home, ignore_errors=True)


def _agent_memory(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _prepare(ep: SimpleNamespace) -> str:
    """A fresh migration negotiated and prepared on the agent."""
    mid = os.urandom(8).hex()
    config = pb.VmConfig(name=f"fz{ep.prepared}", memory_bytes=16 << 20, vcpu_count=1,
                         test_guest=pb.TestGuestConfig(working_set_bytes=1 << 20))
    reply = ep.stub.Negotiate(agent_pb2.NegotiateRequest(
        migration_id=mid, vm=config.name, source_host="peer", config=config,
        version=versions.version_info(),
        needs=[agent_pb2.StateVersionFeatures(state_version=versions.STATE_VERSION_MAX)]),
        timeout=30)
    assert reply.accepted, reply.reason
    ep.stub.Prepare(agent_pb2.PrepareRequest(migration_id=mid, config=config), timeout=30)
    ep.prepared += 1
    return mid


ALLOWED_CODES = {grpc.StatusCode.OK, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.ABORTED}


def _push(ep: SimpleNamespace, frames: list[bytes]) -> tuple[grpc.StatusCode, str]:
    try:
        ep.push(iter(frames), timeout=10)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


@fuzz_settings(60)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=3))
def test_fuzz_agent_endpoint_with_garbage(endpoint, frames):
    code, details = _push(endpoint, frames)
    assert code in ALLOWED_CODES, (code, details)


@fuzz_settings(25)
@given(st.lists(frame_specs(), min_size=1, max_size=3))
def test_fuzz_agent_endpoint_with_frames_for_a_real_migration(endpoint, specs):
    """Frames naming a migration that was really negotiated and prepared
    reach the chunk checks; one bad chunk discards the migration (a new one
    is prepared for the next input)."""
    if not endpoint.mid:
        endpoint.mid = _prepare(endpoint)
    code, details = _push(endpoint, [render(s, endpoint.mid) for s in specs])
    assert code in ALLOWED_CODES, (code, details)
    if code != grpc.StatusCode.OK:
        with contextlib.suppress(grpc.RpcError):
            endpoint.stub.Abort(agent_pb2.AbortRequest(migration_id=endpoint.mid), timeout=10)
        endpoint.mid = ""


def test_agent_endpoint_survives_fuzzing(endpoint):
    """Runs after the two above: the agent answers and has not grown without bound."""
    if endpoint.mid:
        with contextlib.suppress(grpc.RpcError):
            endpoint.stub.Abort(agent_pb2.AbortRequest(migration_id=endpoint.mid), timeout=10)
    info = endpoint.stub.GetHostInfo(agent_pb2.AgentEmpty(), timeout=10)
    assert info.name == "host1"
    _rss, hwm = _agent_memory(endpoint.pid)
    assert hwm < 512 << 20, f"the agent's peak RSS reached {hwm >> 20} MiB"
    assert info.vm_count == 0, "a prepared migration was left behind"


# ---------------------------------------------------------------- regressions the fuzzers found


@pytest.mark.parametrize("bomb", [BOMB, CLAIMS_4GIB], ids=["150MiB-in-5KB", "claims-4GiB"])
def test_compressed_chunk_is_capped_at_its_own_size(bomb):
    """Decompression must stop at the chunk's pages (docs/protocol.md). A zstd
    frame that states its content size makes zstandard allocate that size
    whatever max_output_size says, so the size must be checked first."""
    assert len(bomb) <= PAGE + 1024          # passes the "no larger than its pages" check
    chunk = Chunk(0, 1, ZSTD, 1, bomb)
    mem = mmap.mmap(-1, STREAM_LAYOUT.size)
    try:
        with bounded(headroom=32 << 20), pytest.raises(BadChunk):
            Decoder(mem, STREAM_LAYOUT).apply(chunk)
    finally:
        mem.close()


def test_inspect_prints_a_chunk_of_unknown_encoding(workdir):
    """`vmigrate inspect` prints any file or says in one line why not: a chunk
    encoding it does not know is not a KeyError traceback."""
    frames = frames_of(bases()["base"])
    rec = file_pb2.MemoryRecord(round=0, chunks=[pb.MemoryChunk(
        guest_phys_addr=0, page_count=1, encoding=4, data=b"x")])
    frames = [(k, f, rec.SerializeToString() if k == snapfile.MEMORY else p)
              for k, f, p in frames]
    outcome = inspect_file(reframe(frames), workdir)
    assert outcome == "accepted" or outcome.startswith("InspectError"), outcome


@pytest.mark.xfail(strict=True, reason=(
    "pages.Decoder trusts the round number: in a round-0 frame a ZERO chunk is a "
    "no-op even for a page an earlier chunk of the same migration wrote, so a sender "
    "that repeats a page in round 0 (or labels a late frame round 0) leaves stale data "
    "where it said zeros. Fix: track written pages in the Decoder and clear those."))
def test_a_zero_chunk_always_leaves_zeros():
    data = bytes(range(256)) * 16
    frame = build_frame("m", 0, [(PAGE, 1, RAW, xxhash.xxh3_64_intdigest(data), data),
                                 (PAGE, 1, ZERO, 0, b"")], {})
    mem = mmap.mmap(-1, STREAM_LAYOUT.size)
    try:
        header, chunks = pagestream.decode(frame)
        dec = Decoder(mem, STREAM_LAYOUT, fresh=header.round == 0)
        for c in chunks:
            dec.apply(c)
        assert mem[PAGE:2 * PAGE] == bytes(PAGE), "the page kept the data sent before the zeros"
    finally:
        mem.close()


@pytest.mark.xfail(strict=True, reason=(
    "the xxh3 checksum covers a chunk's data but not its header (address, page count, "
    "encoding): a damaged address puts good data at the wrong place unnoticed (in "
    "plaintext mode, or from a sender bug). Fix: fold the header into the checksum, e.g. "
    "seed xxh3 with the address and page count, with a page-stream version bump."))
def test_a_damaged_chunk_address_is_caught():
    data = bytes(range(256)) * 16
    good = xxhash.xxh3_64_intdigest(data)
    # what one flipped bit in the header's address (0x1000 -> 0x3000) amounts to
    frame = build_frame("m", 1, [(3 * PAGE, 1, RAW, good, data)], {})
    mem = mmap.mmap(-1, STREAM_LAYOUT.size)
    try:
        _header, chunks = pagestream.decode(frame)
        with pytest.raises(BadChunk):
            Decoder(mem, STREAM_LAYOUT, fresh=False).apply(chunks[0])
    finally:
        mem.close()
