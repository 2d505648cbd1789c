"""Checkpoint a running guest to a file, and restore it from one (or a chain).

A checkpoint is live by default: memory is pre-copied into the file while the
guest runs (migrate/precopy.py with a file as the sink), then the guest is
paused only for the last dirty pages and its device state, and resumed before
the file is sealed. If anything fails the file is discarded and the guest
keeps running. An incremental checkpoint stores only pages whose content
differs from its parent's page index; a restore applies the chain oldest
first.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

from vmigrate.migrate import pages, precopy, progress, snapfile, store, translate, versions
from vmigrate.migrate.errors import AgentError
from vmigrate.migrate.vms import LocalVm
from vmigrate.proto import agent_pb2, file_pb2
from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm.client import MappedMemory, VmmError
from vmigrate.vmm.memory import data_ranges

if TYPE_CHECKING:
    from vmigrate.migrate.agent import Agent

CONSOLE_TAIL = 64 << 10
MAX_CHAIN = 64


class FileSink:
    """Pre-copy into a checkpoint file as MEMORY records, keeping the page index."""

    def __init__(self, writer: snapfile.SnapshotWriter, encoder: pages.Encoder,
                 hashes: np.ndarray) -> None:
        self.writer = writer
        self.encoder = encoder
        self.hashes = hashes
        self.counts = pages.Counts()

    def send_pages(self, round_: int, bitmap: np.ndarray, skip_zero: bool,
                   tick: precopy.Tick) -> int:
        n = 0
        for batch in precopy.encode_batches(self.encoder, bitmap, self.counts, skip_zero, tick,
                                            self.hashes):
            self.writer.write_memory(round_, [c.to_msg() for c in batch])
            n += sum(len(c.data) + 24 for c in batch)
        return n


class MappedSink(FileSink):
    """Pre-copy into a checkpoint's memory image (the mapped layout): pages are
    written raw at their place, a later round simply overwrites them."""

    def send_pages(self, round_: int, bitmap: np.ndarray, skip_zero: bool,
                   tick: precopy.Tick) -> int:
        n = 0
        layout = self.encoder.layout
        for batch in precopy.encode_batches(self.encoder, bitmap, self.counts, skip_zero, tick,
                                            self.hashes):
            for c in batch:
                off = layout.offset_of(c.gpa, c.pages * pages.PAGE)
                if c.encoding == pages.ZERO:
                    self.writer.zero_image(off, c.pages * pages.PAGE)
                else:
                    self.writer.write_image(off, c.data)
                    n += len(c.data)
        return n


def _compress_choice(value: str) -> tuple[bool, int]:
    if value in ("", "auto"):
        return True, pages.ZSTD_LEVEL
    if value == "off":
        return False, 0
    try:
        level = int(value)
    except ValueError:
        raise ValueError(f"--compress takes auto, off or a zstd level, not {value!r}") from None
    if not -7 <= level <= 19:
        raise ValueError("zstd levels run from -7 to 19")
    return True, level


def checkpoint_vm(agent: Agent, req: agent_pb2.CheckpointRequest,
                  context: grpc.ServicerContext) -> Iterator[agent_pb2.Progress]:
    vm = agent.vms.get(req.name)
    vm.begin("checkpoint")
    try:
        yield from progress.relay(lambda emit: _checkpoint(agent, vm, req, emit), vm.cancel,
                                  f"checkpoint-{vm.name}")
    finally:
        vm.end()


def _checkpoint(agent: Agent, vm: LocalVm, req: agent_pb2.CheckpointRequest,
                emit: progress.Emit) -> agent_pb2.Progress:
    if vm.incoming_migration:
        raise AgentError(f"{vm.name} is arriving by migration", grpc.StatusCode.ABORTED)
    path = Path(req.path)
    if not path.is_absolute():
        raise ValueError(f"checkpoint path must be absolute (on host {agent.name}): {path}")
    target = req.target_state_version or versions.STATE_VERSION_MAX
    compress, level = _compress_choice(req.compress)
    t_start = time.monotonic()
    writer: snapfile.SnapshotWriter | None = None
    memory: MappedMemory | None = None
    paused_at = 0.0
    resumed = True
    dirty_on = False
    destroyed = False
    encoder = None
    try:
        parent_hashes, parent = _parent_index(req.incremental_from, vm.name) \
            if req.incremental_from else (None, None)
        status = vm.status()
        if status.state not in (2, 3):       # RUNNING, PAUSED
            raise AgentError(f"{vm.name} is not running (it is {status.state})")
        was_paused = status.state == 3
        info = vm.client.memory()
        layout = pages.Layout.from_msg(info.layout)
        header = file_pb2.FileHeader(
            producer=f"vmigrate {versions.software_version()}", state_version=target,
            vm=vm.name, created_at=time.time(), memory_bytes=info.size)
        if parent is not None:
            # Relative to this file, so a chain moved or copied together still restores.
            header.parent_path = os.path.relpath(Path(req.incremental_from).resolve(),
                                                 path.resolve().parent)
            header.parent_id = parent.header.file_id
        # Refuse a target version we cannot express before writing anything.
        needs, why_not = translate.writable_versions(vm.config, list(status.features_in_use))
        if target in why_not:
            raise AgentError(f"cannot write state version {target}: {why_not[target]}")
        if target not in needs:
            raise ValueError(f"this vmigrate writes state versions {versions.STATE_VERSION_MIN}"
                             f"-{versions.STATE_VERSION_MAX}, not {target}")
        header.required_features.extend(needs[target])
        mapped = req.lazy_layout
        if mapped and parent is not None:
            raise ValueError("a mapped checkpoint holds all of memory: it cannot be "
                             "incremental")
        header.mapped_memory = mapped
        writer = snapfile.SnapshotWriter(path, header)
        memory = MappedMemory(info)
        encoder = pages.Encoder(memory.map, layout, compress and not mapped, level)
        hashes = np.full(layout.pages, pages.ZERO_PAGE_HASH, dtype=np.uint64)
        if mapped:
            header.memory_offset = writer.begin_image(info.size)
        emit(agent_pb2.Progress(phase="precopy", message=f"writing {path}"))

        vm.client.start_dirty_log()
        dirty_on = True
        t_log = time.monotonic()
        if parent_hashes is not None:
            first = _changed_since(memory, layout, parent_hashes)
            fresh = False
        else:
            first = pages.bitmap_from_ranges(data_ranges(memory.fd, info.size), layout.pages)
            fresh = True
        sink = MappedSink(writer, encoder, hashes) if mapped else \
            FileSink(writer, encoder, hashes)
        pc = precopy.Precopy(
            vmm=vm.client, layout=layout, sink=sink,
            policy=precopy.Policy(downtime_ms=20.0, max_rounds=8, auto_converge=False),
            cancel=vm.cancel, progress=emit, last_fetch=t_log)
        if was_paused:
            pc.send_round(0, first, skip_zero=fresh)
            last = np.zeros_like(first)
        else:
            last = pc.run(first, fresh_target=fresh)
        # The console as of the pause: what the restored guest printed last.
        pre_console, console_end = vm.client.console_tail(CONSOLE_TAIL)
        if not was_paused:
            paused_at = time.monotonic()
            resumed = False
        paused = vm.client.pause_and_save("checkpoint", console_from=console_end)
        final = np.bitwise_or(last, np.frombuffer(paused.dirty_bitmap, dtype=np.uint64))
        pc.send_round(len(pc.rounds), final, skip_zero=False)
        state = translate.translate(paused.state, target)
        console = (pre_console + paused.console)[-CONSOLE_TAIL:]
        vm.client.stop_dirty_log()
        dirty_on = False
        if not was_paused and not req.stop:
            vm.client.resume()
            resumed = True
        pause_ms = (time.monotonic() - paused_at) * 1000 if paused_at else 0.0
        writer.write_state(state)
        writer.write_page_index(hashes.tobytes())
        writer.write_console(console)
        c = pc.counts
        trailer = file_pb2.FileTrailer(
            memory_pages=c.pages, pages_zero=c.pages_zero, pages_raw=c.pages_raw,
            pages_compressed=c.pages_compressed, rounds=len(pc.rounds), pause_ms=pause_ms)
        emit(agent_pb2.Progress(phase="sealing", message="syncing the file to disk"))
        trailer.total_ms = (time.monotonic() - t_start) * 1000
        size = writer.finish(trailer)
        writer = None
        if req.stop and not was_paused:
            destroyed = True
            agent.vms.destroy(vm, "stopped after checkpoint")
            with contextlib.suppress(store.StoreError):
                agent.store.delete_vm(vm.name, agent.name)
        unchanged = layout.pages - int(pages.count_pages(first)) if parent is not None else 0
        return agent_pb2.Progress(phase="done", checkpoint=agent_pb2.CheckpointReport(
            path=str(path), file_bytes=size, pages_zero=c.pages_zero, pages_raw=c.pages_raw,
            pages_compressed=c.pages_compressed, pages_unchanged=unchanged, pause_ms=pause_ms,
            total_ms=(time.monotonic() - t_start) * 1000, rounds=len(pc.rounds),
            state_version=target, vm=vm.name))
    finally:
        if encoder is not None:
            encoder.close()
        if writer is not None:
            writer.abort()
        if memory is not None:
            memory.close()
        if not destroyed:
            with contextlib.suppress(VmmError):
                if dirty_on:
                    vm.client.stop_dirty_log()
                if not resumed:
                    vm.client.resume()   # a failed checkpoint leaves the guest running


def _parent_index(path_str: str, vm_name: str) -> tuple[np.ndarray, snapfile.Snapshot]:
    snap, _ = snapfile.load(Path(path_str))
    if snap.header.vm != vm_name:
        raise ValueError(f"{path_str} is a checkpoint of {snap.header.vm!r}, not {vm_name!r}")
    if not snap.page_index:
        raise ValueError(f"{path_str} has no page index: it cannot be the parent of an "
                         "incremental checkpoint")
    return np.frombuffer(snap.page_index, dtype=np.uint64), snap


def _changed_since(memory: MappedMemory, layout: pages.Layout,
                   parent: np.ndarray) -> np.ndarray:
    """Pages whose content differs from the parent's page index."""
    if len(parent) != layout.pages:
        raise ValueError("the parent checkpoint's memory size differs from this guest's")
    current = np.full(layout.pages, pages.ZERO_PAGE_HASH, dtype=np.uint64)
    for off, length in data_ranges(memory.fd, memory.size):
        first, count = off // pages.PAGE, length // pages.PAGE
        current[first:first + count] = pages.page_hashes(memory.map, first, count)
    changed = (current != parent).astype(np.uint8)
    padded = np.zeros(((layout.pages + 63) // 64) * 64, dtype=np.uint8)
    padded[:layout.pages] = changed
    return np.packbits(padded, bitorder="little").view(np.uint64)


# ---------------------------------------------------------------- restore


def load_chain(path: Path) -> list[snapfile.Snapshot]:
    """The file and its ancestors, oldest first, each checked for readability."""
    chain: list[snapfile.Snapshot] = []
    current: Path | None = path
    expected_id = ""
    while current is not None:
        if len(chain) >= MAX_CHAIN:
            raise snapfile.SnapshotError(f"{path}: incremental chain longer than {MAX_CHAIN}")
        snap, _ = snapfile.load(current)
        if expected_id and snap.header.file_id != expected_id:
            raise snapfile.SnapshotError(
                f"{current} is not the parent {chain[-1].path} was made from "
                "(it was replaced or rewritten)")
        snapfile.check_readable(snap.header, (versions.STATE_VERSION_MIN,
                                              versions.STATE_VERSION_MAX),
                                versions.FEATURES, current)
        chain.append(snap)
        if snap.header.parent_path:
            parent = Path(snap.header.parent_path)
            if not parent.is_absolute():
                parent = current.resolve().parent / parent
            current, expected_id = parent, snap.header.parent_id
            if not current.exists():
                raise snapfile.SnapshotError(
                    f"{path} is incremental and its parent {current} is missing")
        else:
            current = None
    chain.reverse()
    return chain


def decode_state(snap: snapfile.Snapshot) -> pb.VmState:
    state = pb.VmState()
    try:
        state.ParseFromString(snap.state_bytes)
    except Exception:
        raise snapfile.Corrupt(f"{snap.path}: the VM state does not decode") from None
    if state.state_version != snap.header.state_version:
        raise snapfile.Corrupt(f"{snap.path}: header and state disagree on the state version")
    return translate.translate(state, versions.STATE_VERSION_MAX)


def apply_memory(chain: list[snapfile.Snapshot], memory: MappedMemory,
                 layout: pages.Layout) -> pages.Counts:
    """Write every memory record of the chain into fresh guest memory, oldest first."""
    decoder = pages.Decoder(memory.map, layout, fd=memory.fd, fresh=True)
    for i, snap in enumerate(chain):
        with snapfile.SnapshotReader(snap.path) as r:
            for frame in r.frames():
                if frame.kind != snapfile.MEMORY:
                    continue
                rec = file_pb2.MemoryRecord()
                try:
                    rec.ParseFromString(frame.payload)
                except Exception:
                    raise snapfile.Corrupt(f"{snap.path}: a memory record does not decode") \
                        from None
                decoder.fresh = i == 0 and rec.round == 0
                for chunk in rec.chunks:
                    try:
                        decoder.apply(chunk)
                    except pages.BadChunk as e:
                        raise snapfile.Corrupt(f"{snap.path}: {e}") from None
    decoder.close()
    return decoder.counts


def copy_image(snap: snapfile.Snapshot, memory: MappedMemory) -> pages.Counts:
    """Read a mapped-layout image into guest memory (its holes stay holes),
    checking every page against the page index."""
    assert snap.image is not None
    image_off, length = snap.image
    hashes = np.frombuffer(snap.page_index, dtype=np.uint64)
    counts = pages.Counts()
    fd = os.open(snap.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for off, n in data_ranges(fd, image_off + length, start=image_off):
            pos, end = off, off + n
            while pos < end:
                size = min(4 << 20, end - pos)
                mem = pos - image_off
                with memoryview(memory.map) as view:
                    got = os.preadv(fd, [view[mem:mem + size]], pos)
                if got != size:
                    raise snapfile.Truncated(f"{snap.path}: the memory image is short")
                first, npages = mem // pages.PAGE, size // pages.PAGE
                bad = pages.first_mismatch(memory.map, first, hashes[first:first + npages])
                if bad is not None:
                    raise snapfile.Corrupt(
                        f"{snap.path}: page at {(first + bad) * pages.PAGE:#x} of its memory "
                        "image does not match its page index")
                counts.pages_raw += npages
                pos += size
    finally:
        os.close(fd)
    return counts


def restore_vm(agent: Agent, req: agent_pb2.RestoreRequest,
               context: grpc.ServicerContext) -> Iterator[agent_pb2.Progress]:
    yield from progress.relay(lambda emit: _restore(agent, req, emit), None, "restore")


def _restore(agent: Agent, req: agent_pb2.RestoreRequest,
             emit: progress.Emit) -> agent_pb2.Progress:
    t_start = time.monotonic()
    path = Path(req.path)
    if not path.is_absolute():
        raise ValueError(f"checkpoint path must be absolute (on host {agent.name}): {path}")
    try:
        chain = load_chain(path)
        state = decode_state(chain[-1])
    except snapfile.SnapshotError as e:
        raise AgentError(str(e), grpc.StatusCode.INVALID_ARGUMENT) from None
    config = pb.VmConfig()
    config.CopyFrom(state.config)
    if req.name:
        config.name = req.name
        state.config.name = req.name
    layout_ok = pages.Layout.from_msg(state.memory)
    if layout_ok.size != config.memory_bytes:
        raise AgentError(f"{path}: the memory layout does not match the memory size",
                         grpc.StatusCode.INVALID_ARGUMENT)
    if req.lazy and chain[-1].image is None:
        raise AgentError(f"{path} keeps memory compressed: only a mapped checkpoint "
                         "(vmigrate checkpoint --mapped) can be restored lazily",
                         grpc.StatusCode.INVALID_ARGUMENT)
    if chain[-1].image is not None and len(chain) > 1:
        raise AgentError(f"{path}: a mapped checkpoint cannot be part of an incremental chain",
                         grpc.StatusCode.INVALID_ARGUMENT)
    agent.check_kvm()
    agent._check_schedulable()
    emit(agent_pb2.Progress(phase="restore", message=f"restoring {config.name} from {path}"))
    agent.store.create_vm(config.name, agent.name, {"memory_bytes": config.memory_bytes,
                                                    "vcpus": config.vcpu_count})
    vm = None
    memory = None
    try:
        vm = agent.vms.spawn(config, console_seed=chain[-1].console)
        info = vm.client.memory()
        memory = MappedMemory(info, writable=True)
        layout = pages.Layout.from_msg(info.layout)
        if layout.regions != layout_ok.regions:
            raise AgentError(f"{path}: this host lays out {config.memory_bytes >> 20} MiB "
                             "differently from the host that wrote it")
        snap = chain[-1]
        if snap.image is not None and req.lazy:
            memory.close()           # nothing of ours may touch memory while it fills
            memory = None
            vm.client.map_lazy(str(snap.path), snap.image[0], snap.page_index)
            counts = pages.Counts()
        elif snap.image is not None:
            counts = copy_image(snap, memory)
        else:
            counts = apply_memory(chain, memory, layout)
        if memory is not None:
            memory.close()
            memory = None
        vm.client.restore(state)
        try:
            if req.paused:
                vm.client.resume_paused()
            else:
                vm.client.resume()
        except VmmError:
            detail = ""
            with contextlib.suppress(VmmError):
                detail = vm.status().detail      # e.g. a lazy restore found a damaged page
            if detail:
                raise AgentError(f"{path}: {detail}", grpc.StatusCode.DATA_LOSS) from None
            raise
        ms = (time.monotonic() - t_start) * 1000
        agent._update_info()
        return agent_pb2.Progress(phase="done", checkpoint=agent_pb2.CheckpointReport(
            path=str(path), file_bytes=sum(s.size for s in chain), pages_zero=counts.pages_zero,
            pages_raw=counts.pages_raw, pages_compressed=counts.pages_compressed,
            restore_ms=ms, first_instruction_ms=ms, state_version=state.state_version,
            vm=config.name))
    except BaseException as e:
        if memory is not None:
            memory.close()
        if vm is not None:
            agent.vms.destroy(vm, "restore failed")
        with contextlib.suppress(store.StoreError):
            agent.store.delete_vm(config.name, agent.name)
        if isinstance(e, snapfile.SnapshotError):
            raise AgentError(str(e), grpc.StatusCode.INVALID_ARGUMENT) from None
        raise

