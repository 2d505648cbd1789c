"""Checkpoint and restore of real test guests through the CLI, incremental
chains, and hostile checkpoint files: every bad file gets one clear line."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import zstandard

from tests.cluster import ClusterBase
from tests.test_cli import _fails
from vmigrate.migrate import snapfile
from vmigrate.proto import file_pb2
from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm.testguest import report


class Local(ClusterBase):
    def __init__(self, home: Path) -> None:
        self.home = home


@pytest.fixture
def local(short_tmp):
    c = Local(short_tmp / "home")
    c.home.mkdir()
    yield c
    c.run("down", check=False)


def _restored_clean(local, name: str, before_n: dict[int, int], cpus: int) -> report.Report:
    """The restored guest's log (history + new output) counts on without a gap."""
    r = local.wait_heartbeats(name, 3, after=max(before_n.values()), cpus=cpus)
    assert r.clean(), (r.problems, r.gaps())
    for c in range(cpus):
        ns = [hb.n for hb in r.heartbeats[c]]
        assert before_n[c] in ns, f"cpu {c}: heartbeat {before_n[c]} missing after restore"
    return r


@pytest.mark.parametrize(("ws", "rate", "vcpus"), [
    ("8M", "4M", 1),
    ("32M", "64M", 1),
    ("24M", "32M", 2),
])
def test_live_checkpoint_restores_in_a_fresh_process(local, short_tmp, ws, rate, vcpus):
    local.run("run", "vm1", "--test-guest", "--memory", "64M", "--working-set", ws,
              "--dirty-rate", rate, "--vcpus", str(vcpus), "--heartbeat-ms", "200")
    local.wait_heartbeats("vm1", 2, cpus=vcpus)
    path = short_tmp / "vm1.ckpt"
    r = local.json("checkpoint", "vm1", str(path))
    assert r["path"] == str(path) and path.exists()
    assert int(r["file_bytes"]) == path.stat().st_size
    assert r["pause_ms"] < 500
    # the source keeps running (a live checkpoint), still clean
    local.wait_heartbeats("vm1", 3, after=local.report("vm1").last(0).n, cpus=vcpus)
    summary = local.json("inspect", str(path))
    saved_console = report.parse(_history(local, path))
    before = {c: saved_console.last(c).n for c in range(vcpus)}
    assert summary["header"]["vm"] == "vm1"
    local.run("restore", str(path), "--name", "vm1b")
    _restored_clean(local, "vm1b", before, vcpus)
    assert local.report("vm1").clean()


def _history(local, path: Path) -> str:
    snap, _ = snapfile.load(path)
    return snap.console.decode()


def test_incremental_chain_of_three(local, short_tmp):
    local.run("run", "vm1", "--test-guest", "--memory", "64M", "--working-set", "32M",
              "--dirty-rate", "8M", "--heartbeat-ms", "200")
    local.wait_heartbeats("vm1", 2)
    files = [short_tmp / f"c{i}" for i in range(3)]
    full = local.json("checkpoint", "vm1", str(files[0]))

    def written(r: dict) -> int:
        return int(r["pages_raw"]) + int(r["pages_compressed"]) + int(r["pages_zero"])
    unchanged, inc_pages = [], []
    for i in (1, 2):
        local.wait_heartbeats("vm1", 2, after=local.report("vm1").last(0).n)
        r = local.json("checkpoint", "vm1", str(files[i]), "--incremental-from",
                       str(files[i - 1]))
        unchanged.append(int(r["pages_unchanged"]))
        inc_pages.append(written(r))
    assert all(u > 0 for u in unchanged), "incremental files should skip unchanged pages"
    assert all(n < written(full) for n in inc_pages), (inc_pages, written(full))
    head = local.json("inspect", str(files[2]))["header"]
    assert head["parent_path"] == files[1].name      # relative: the chain can move
    before = {0: report.parse(_history(local, files[2])).last(0).n}
    local.run("restore", str(files[2]), "--name", "vm2")
    _restored_clean(local, "vm2", before, 1)
    # the chain is followed: without its grandparent it cannot be restored
    files[0].rename(short_tmp / "moved")
    assert "parent" in _fails(local, "restore", str(files[2]), "--name", "vm3")


def test_checkpoint_stop_then_restore_same_name(local, short_tmp):
    local.run("run", "vm1", "--test-guest", "--heartbeat-ms", "200")
    local.wait_heartbeats("vm1", 2)
    path = short_tmp / "stopped.ckpt"
    local.run("checkpoint", "vm1", str(path), "--stop")
    assert local.json("ps") == []
    n = report.parse(_history(local, path)).last(0).n
    local.run("restore", str(path))
    _restored_clean(local, "vm1", {0: n}, 1)


def test_failed_checkpoint_keeps_the_guest_running(local, short_tmp):
    local.run("run", "vm1", "--test-guest", "--memory", "64M", "--working-set", "32M",
              "--dirty-rate", "16M", "--heartbeat-ms", "200")
    local.wait_heartbeats("vm1", 2)
    assert "does not exist" in _fails(local, "checkpoint", "vm1", str(short_tmp / "no/x.ckpt"))
    # a full disk: a 1 MiB tmpfs cannot hold 32 MiB of (incompressible) pages
    small = short_tmp / "small"
    small.mkdir()
    import subprocess

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        err = _fails(local, "checkpoint", "vm1", str(small / "x.ckpt"), "--compress", "off")
        assert "no space left" in err
        assert list(small.iterdir()) == [], "a failed checkpoint must leave no file behind"
    finally:
        subprocess.run(["umount", str(small)], check=True)
    n = local.report("vm1").last(0).n
    r = local.wait_heartbeats("vm1", 3, after=n)
    assert r.clean()
    assert local.json("ps")[0]["state"] == "running"


# ---------------------------------------------------------------- hostile files


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    """A small real checkpoint of a running test guest."""
    home = tmp_path_factory.mktemp("h")
    c = Local(Path(home))
    try:
        c.run("run", "g", "--test-guest", "--memory", "16M", "--working-set", "2M",
              "--dirty-rate", "1M")
        c.wait_heartbeats("g", 1)
        path = Path(home) / "good.ckpt"
        c.run("checkpoint", "g", str(path))
        return path
    finally:
        c.run("down", check=False)


def _read_all(path: Path) -> None:
    """What a restore does to a file before and while using it."""
    from vmigrate.migrate import checkpoint

    chain = checkpoint.load_chain(path)
    checkpoint.decode_state(chain[-1])
    for snap in chain:
        with snapfile.SnapshotReader(snap.path) as r:
            for frame in r.frames():
                if frame.kind == snapfile.MEMORY:
                    rec = file_pb2.MemoryRecord.FromString(frame.payload)
                    for chunk in rec.chunks:
                        assert chunk.page_count > 0


def _frames(path: Path) -> list[tuple[int, int, bytes]]:
    """(kind, flags, payload-as-stored) of every frame, trailer included."""
    data = path.read_bytes()
    out, off = [], snapfile.PREFIX.size
    end = len(data) - snapfile.FOOTER.size
    while off < end:
        kind, flags, _, length, _ = snapfile.FRAME.unpack_from(data, off)
        out.append((kind, flags, data[off + 16:off + 16 + length]))
        off += 16 + length
    return out


def _write(path: Path, frames: list[tuple[int, int, bytes]], version: int = 1) -> Path:
    """A file with correct checksums, chain and footer around the given frames."""
    import xxhash

    buf = bytearray(snapfile.PREFIX.pack(snapfile.MAGIC, version, 0))
    chain = xxhash.xxh3_64()
    body = [f for f in frames if f[0] != snapfile.TRAILER]
    for kind, flags, payload in body:
        cs = snapfile.frame_checksum(kind, flags, payload)
        buf += snapfile.FRAME.pack(kind, flags, 0, len(payload), cs) + payload
        chain.update(cs.to_bytes(8, "little"))
    trailer = file_pb2.FileTrailer(records=len(body), chain_hash=chain.intdigest())
    payload = trailer.SerializeToString()
    offset = len(buf)
    buf += snapfile.FRAME.pack(snapfile.TRAILER, 0, 0, len(payload),
                               snapfile.frame_checksum(snapfile.TRAILER, 0, payload)) + payload
    buf += snapfile.FOOTER.pack(snapfile.FOOTER_MAGIC, offset)
    path.write_bytes(bytes(buf))
    return path


def _replace(frames, kind, fn):
    return [(k, f, fn(p) if k == kind else p) for k, f, p in frames]


def _header_with(**fields):
    def edit(payload: bytes) -> bytes:
        h = file_pb2.FileHeader.FromString(payload)
        for k, v in fields.items():
            if isinstance(v, list):
                getattr(h, k).extend(v)
            else:
                setattr(h, k, v)
        return h.SerializeToString()
    return edit


def test_good_file_reads(good_file):
    _read_all(good_file)
    # and re-framing it with the test's writer gives an equally good file
    _read_all(_write(good_file.with_suffix(".copy"), _frames(good_file)))


def test_truncated_at_any_point(good_file, tmp_path):
    data = good_file.read_bytes()
    cuts = sorted({0, 1, 8, 15, 16, 20, 31, 32, 100, len(data) // 3, len(data) // 2,
                   len(data) - 17, len(data) - 16, len(data) - 9, len(data) - 1,
                   *range(0, len(data), max(1, len(data) // 40))})
    for cut in cuts:
        bad = tmp_path / f"t{cut}"
        bad.write_bytes(data[:cut])
        with pytest.raises(snapfile.SnapshotError):
            _read_all(bad)


def test_a_flipped_bit_anywhere(good_file, tmp_path):
    data = good_file.read_bytes()
    step = max(1, len(data) // 150)
    positions = sorted({*range(0, 40), *range(0, len(data), step), *range(len(data) - 40,
                                                                           len(data))})
    for pos in positions:
        for bit in (0, 7):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            path = tmp_path / "flip"
            path.write_bytes(bytes(bad))
            with pytest.raises(snapfile.SnapshotError):
                _read_all(path)


def test_wrong_magic_empty_and_directory(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    data[:8] = b"NOTVMIG!"
    (tmp_path / "magic").write_bytes(bytes(data))
    with pytest.raises(snapfile.Corrupt, match="wrong magic"):
        _read_all(tmp_path / "magic")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(snapfile.Truncated, match="empty"):
        _read_all(tmp_path / "empty")
    with pytest.raises(snapfile.SnapshotError, match="directory"):
        _read_all(tmp_path)
    (tmp_path / "text").write_text("hello, I am not a checkpoint\n" * 10)
    with pytest.raises(snapfile.Corrupt, match="wrong magic"):
        _read_all(tmp_path / "text")


def test_future_format_and_state_versions(good_file, tmp_path):
    frames = _frames(good_file)
    with pytest.raises(snapfile.Unsupported, match="file format 2"):
        _read_all(_write(tmp_path / "fmt", frames, version=2))
    with pytest.raises(snapfile.Unsupported, match="state version 99"):
        _read_all(_write(tmp_path / "sv", _replace(frames, snapfile.HEADER,
                                                   _header_with(state_version=99))))


def test_required_feature_this_build_lacks(good_file, tmp_path):
    frames = _replace(_frames(good_file), snapfile.HEADER,
                      _header_with(required_features=["dev.virtio-net"]))
    with pytest.raises(snapfile.Unsupported, match=r"dev\.virtio-net"):
        _read_all(_write(tmp_path / "feat", frames))


def test_decompression_bombs(good_file, tmp_path):
    frames = _frames(good_file)
    # a state record that says it inflates to 80 MiB (more than any state may be)
    big = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * (80 << 20))
    assert zstandard.get_frame_parameters(big).content_size == 80 << 20
    with pytest.raises(snapfile.Corrupt, match="decompression bomb"):
        _read_all(_write(tmp_path / "b1", [(k, snapfile.FLAG_ZSTD, big) if k == snapfile.STATE
                                           else (k, f, p) for k, f, p in frames]))
    # ...and one that does not say how big it is but inflates past the cap
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    stream = cobj.compress(b"\0" * (80 << 20)) + cobj.flush()
    with pytest.raises(snapfile.Corrupt, match="does not decompress within"):
        _read_all(_write(tmp_path / "b2", [(k, snapfile.FLAG_ZSTD, stream)
                                           if k == snapfile.STATE else (k, f, p)
                                           for k, f, p in frames]))
    # a memory chunk whose compressed pages inflate past the chunk's size
    def bomb_chunk(payload: bytes) -> bytes:
        rec = file_pb2.MemoryRecord.FromString(payload)
        rec.chunks.append(pb.MemoryChunk(guest_phys_addr=0x200000, page_count=1,
                                         encoding=pb.MemoryChunk.ZSTD,
                                         data=zstandard.ZstdCompressor().compress(
                                             b"\1" * (64 << 20)), checksum=1))
        return rec.SerializeToString()
    from vmigrate.migrate import checkpoint, pages
    from vmigrate.vmm.client import MappedMemory  # noqa: F401

    path = _write(tmp_path / "b3", _replace(frames, snapfile.MEMORY, bomb_chunk))
    chain = checkpoint.load_chain(path)
    state = checkpoint.decode_state(chain[-1])
    import mmap

    mem = mmap.mmap(-1, state.config.memory_bytes)
    layout = pages.Layout.from_msg(state.memory)

    class Mem:
        map = mem
        fd = None

    with pytest.raises(snapfile.Corrupt, match=r"larger than its pages|decompress"):
        checkpoint.apply_memory(chain, Mem, layout)  # type: ignore[arg-type]
    # a record whose length field claims 4 GiB is refused before anything is read
    data = bytearray(good_file.read_bytes())
    struct.pack_into("<I", data, snapfile.PREFIX.size + 4, 0xFFFFFFFF)
    (tmp_path / "len").write_bytes(bytes(data))
    with pytest.raises(snapfile.Corrupt, match="claims"):
        _read_all(tmp_path / "len")


def test_chunk_outside_guest_memory(good_file, tmp_path):
    from vmigrate.migrate import checkpoint, pages

    def stray(payload: bytes) -> bytes:
        rec = file_pb2.MemoryRecord.FromString(payload)
        rec.chunks.append(pb.MemoryChunk(guest_phys_addr=1 << 40, page_count=1,
                                         encoding=pb.MemoryChunk.ZERO))
        return rec.SerializeToString()
    path = _write(tmp_path / "stray", _replace(_frames(good_file), snapfile.MEMORY, stray))
    chain = checkpoint.load_chain(path)
    state = checkpoint.decode_state(chain[-1])
    import mmap

    class Mem:
        map = mmap.mmap(-1, state.config.memory_bytes)
        fd = None

    with pytest.raises(snapfile.Corrupt, match="outside guest memory"):
        checkpoint.apply_memory(chain, Mem, pages.Layout.from_msg(state.memory))  # type: ignore


def test_bad_files_through_the_cli(local, good_file, tmp_path):
    """The user's view: one line, exit 1, and nothing left behind on the host."""
    data = good_file.read_bytes()
    cases = {
        "truncated": data[:len(data) // 2],
        "flipped": data[:200] + bytes([data[200] ^ 0x10]) + data[201:],
        "empty": b"",
        "magic": b"X" + data[1:],
    }
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        for cmd in (["restore", str(p), "--name", "x"], ["inspect", str(p)]):
            err = _fails(local, *cmd)
            assert str(p) in err or "checkpoint" in err, err
    for cmd in (["restore", str(tmp_path)], ["inspect", str(tmp_path)],
                ["restore", str(tmp_path / "nope")]):
        _fails(local, *cmd)
    future = _write(tmp_path / "future", _replace(_frames(good_file), snapfile.HEADER,
                                                  _header_with(state_version=7)))
    assert "upgrade vmigrate" in _fails(local, "restore", str(future))
    assert local.json("ps") == []
    # only the agent's spare (standby) VMM is left, no guest's directory
    assert [d.name for d in (local.home / "local" / "vms").iterdir()
            if not d.name.startswith(".standby-")] == []


# ---------------------------------------------------------------- mapped layout, lazy restore


def test_mapped_checkpoint_restores_lazily_and_fully(local, short_tmp):
    local.run("run", "vm1", "--test-guest", "--memory", "128M", "--working-set", "64M",
              "--dirty-rate", "64M", "--heartbeat-ms", "200")
    local.wait_heartbeats("vm1", 4)                    # the working set written once
    path = short_tmp / "vm1.map"
    r = local.json("checkpoint", "vm1", str(path), "--mapped")
    info = local.json("inspect", str(path))
    assert info["memory_image"]["length"] == 128 << 20
    assert info["memory_image"]["pages_with_data"] >= 64 * 256
    assert int(r["file_bytes"]) == path.stat().st_size
    before = {0: report.parse(_history(local, path)).last(0).n}
    lazy = local.json("restore", str(path), "--name", "lazy", "--lazy")
    full = local.json("restore", str(path), "--name", "full")
    assert lazy["restore_ms"] < full["restore_ms"]
    for name in ("lazy", "full"):
        _restored_clean(local, name, before, 1)
    # a guest still filling from its file can be moved on: its memory is complete first
    local.run("checkpoint", "lazy", str(short_tmp / "again.ckpt"))
    local.run("restore", str(short_tmp / "again.ckpt"), "--name", "again")
    _restored_clean(local, "again", {0: report.parse(_history(local, short_tmp / "again.ckpt"))
                                     .last(0).n}, 1)


def test_damaged_mapped_image_is_caught(local, short_tmp):
    local.run("run", "vm1", "--test-guest", "--memory", "64M", "--working-set", "16M",
              "--dirty-rate", "64M", "--heartbeat-ms", "200")
    local.wait_heartbeats("vm1", 2)
    path = short_tmp / "vm1.map"
    local.run("checkpoint", "vm1", str(path), "--mapped", "--stop")
    offset = local.json("inspect", str(path))["memory_image"]["offset"]
    data = bytearray(path.read_bytes())
    data[offset + 0x200000 + 100] ^= 0xFF          # a byte of the working set's first page
    path.write_bytes(bytes(data))
    err = _fails(local, "restore", str(path), "--name", "full")
    assert "does not match its page index" in err, err
    # lazily, the page may be read before the guest starts (the restore fails) or
    # after (the guest is stopped); either way it is never fed the damaged page
    p = local.run("restore", str(path), "--name", "lazy", "--lazy", check=False)
    if p.returncode != 0:
        assert "damaged" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "lazy" not in {v["name"] for v in local.json("ps")}
        return
    import time

    deadline = time.monotonic() + 30
    while True:
        vm = {v["name"]: v for v in local.json("ps")}["lazy"]
        if vm["state"] == "crashed":
            assert "damaged" in vm["detail"], vm
            break
        assert time.monotonic() < deadline, vm
        time.sleep(0.2)
    assert "CORRUPT" not in local.logs("lazy")


def test_lazy_needs_a_mapped_file(local, short_tmp):
    local.run("run", "vm1", "--test-guest")
    local.wait_heartbeats("vm1", 1)
    local.run("checkpoint", "vm1", str(short_tmp / "plain.ckpt"))
    assert "checkpoint --mapped" in _fails(local, "restore", str(short_tmp / "plain.ckpt"),
                                           "--name", "x", "--lazy")
    assert "cannot be incremental" in _fails(local, "checkpoint", "vm1", str(short_tmp / "m"),
                                             "--mapped", "--incremental-from",
                                             str(short_tmp / "plain.ckpt"))
