"""The source side of a live migration: `vmigrate send HOST VM` (docs/protocol.md).

    negotiate -> begin (store) -> prepare -> pre-copy rounds -> pause ->
    last pages + state -> switchover -> COMMIT (store CAS) -> commit -> teardown

Before the commit every failure resumes the guest here and discards the
destination. The commit is one compare-and-swap in the cluster store; after
it only the destination may run the guest. If the destination cannot be told
(network gone), the source keeps its paused copy until the destination's
fate is known: it never resumes a guest the store gave away.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np

from vmigrate.migrate import (
    channels,
    faults,
    hostinfo,
    pages,
    pagestream,
    precopy,
    progress,
    store,
    translate,
    versions,
)
from vmigrate.migrate.compression import CompressionGovernor
from vmigrate.migrate.errors import AgentError, Cancelled, Refused
from vmigrate.migrate.progress import Stopwatch
from vmigrate.migrate.vms import LocalVm
from vmigrate.proto import agent_pb2, agent_pb2_grpc
from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm.client import MappedMemory, VmmError
from vmigrate.vmm.memory import data_ranges

if TYPE_CHECKING:
    from vmigrate.migrate.agent import Agent

log = logging.getLogger("vmigrate.outgoing")
STATES = {1: "created", 4: "stopped", 5: "crashed"}

RPC_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 600.0
COMMIT_CONFIRM_S = 60.0
DEFAULT_STREAMS = 2
CONSOLE_TAIL = 64 << 10
BLOCK_WORDS = 4                   # 256 pages: the unit streams share work in
INLINE_PAGES_MAX = 4096           # last pages up to 16 MiB travel inside the switchover


def split_bitmap(bitmap: np.ndarray, n: int) -> list[np.ndarray]:
    """Deal 1 MiB blocks of the bitmap round-robin to n streams."""
    if n <= 1:
        return [bitmap]
    words = len(bitmap)
    padded = np.zeros(((words + BLOCK_WORDS * n - 1) // (BLOCK_WORDS * n)) * BLOCK_WORDS * n,
                      dtype=np.uint64)
    padded[:words] = bitmap
    blocks = padded.reshape(-1, BLOCK_WORDS)
    out = []
    for i in range(n):
        part = np.zeros_like(blocks)
        part[i::n] = blocks[i::n]
        out.append(part.reshape(-1)[:words])
    return out


class RateLimit:
    """A token bucket shared by a migration's streams (--bandwidth)."""

    def __init__(self, bytes_per_s: int) -> None:
        self.rate = bytes_per_s
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.rate
            wait = start - now
        if wait > 0:
            time.sleep(wait)


class NetworkSink:
    """Sends a round's pages over `streams` parallel gRPC streams; returns when
    the destination has acknowledged every one (rounds never overlap, so a
    later copy of a page can never be overtaken by an older one)."""

    def __init__(self, channel: grpc.Channel, migration_id: str,
                 encoders: list[pages.Encoder], limit: RateLimit,
                 governor: CompressionGovernor) -> None:
        self.push = pagestream.push_callable(channel)
        self.governor = governor
        self.id = migration_id
        self.streams = len(encoders)
        self.encoders = encoders
        self.counts = pages.Counts()
        self.limit = limit
        self.chunks_sent = 0
        self.pages_sent = 0
        self._lock = threading.Lock()

    def send_pages(self, round_: int, bitmap: np.ndarray, skip_zero: bool,
                   tick: precopy.Tick) -> int:
        parts = split_bitmap(bitmap, self.streams)
        results: list[object] = [None] * len(parts)
        threads = []
        for i, part in enumerate(parts):
            t = threading.Thread(target=self._stream,
                                 args=(i, round_, part, skip_zero, tick, results),
                                 name=f"stream{i}", daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        sent = 0
        for r in results:
            if isinstance(r, BaseException):
                raise r
            sent += int(r)  # type: ignore[arg-type]
        return sent

    def _stream(self, i: int, round_: int, bitmap: np.ndarray, skip_zero: bool,
                tick: precopy.Tick, results: list[object]) -> None:
        local = pages.Counts()
        sent = [0]
        stopped: list[BaseException] = []

        def frames() -> Iterator[bytes]:
            # gRPC swallows exceptions raised here, so a cancel or timeout ends
            # the stream quietly and is re-raised below.
            try:
                for chunks in self.encoders[i].batches(bitmap, local, skip_zero=skip_zero):
                    frame = pagestream.encode(self.id, round_, chunks)
                    frame_pages = sum(c.pages for c in chunks)
                    self.limit.take(len(frame))
                    sent[0] += len(frame)
                    with self._lock:
                        self.chunks_sent += len(chunks)
                        self.pages_sent += frame_pages
                        self.counts.add(local)
                        local.__init__()
                    yield frame
                    self.governor.observe(len(frame), frame_pages * pages.PAGE)
                    tick()
            except Exception as e:
                stopped.append(e)
        try:
            self.push(frames(), timeout=STREAM_TIMEOUT_S)
            results[i] = stopped[0] if stopped else sent[0]
        except grpc.RpcError as e:
            results[i] = stopped[0] if stopped else channels.rpc_error("memory stream", e)
        except BaseException as e:
            results[i] = e
        finally:
            with self._lock:
                self.counts.add(local)


@dataclass
class Options:
    downtime_ms: float
    streams: int
    compress: str
    bandwidth: int
    timeout_s: float
    auto_converge: bool


def _options(req: agent_pb2.SendRequest) -> Options:
    streams = req.streams or DEFAULT_STREAMS
    if not 1 <= streams <= 16:
        raise ValueError("--streams must be 1 to 16")
    compress = req.compress or "auto"
    if compress not in ("auto", "off") and not compress.lstrip("-").isdigit():
        raise ValueError(f"--compress takes auto, off or a zstd level, not {compress!r}")
    return Options(downtime_ms=float(req.downtime_ms or 20), streams=streams, compress=compress,
                   bandwidth=req.bandwidth_bytes_per_s, timeout_s=req.timeout_s or 0.0,
                   auto_converge=True)


def send_vm(agent: Agent, req: agent_pb2.SendRequest,
            context: grpc.ServicerContext) -> Iterator[agent_pb2.Progress]:
    vm = agent.vms.get(req.name)
    if vm.incoming_migration:
        raise AgentError(f"{vm.name} is still arriving here", grpc.StatusCode.ABORTED)
    opts = _options(req)
    dest = req.destination
    if dest == agent.name:
        raise ValueError(f"{vm.name} already runs on {dest}")
    vm.begin("send")
    try:
        yield from progress.relay(lambda emit: Migration(agent, vm, dest, opts, emit).run(),
                                  vm.cancel, f"send-{vm.name}")
    finally:
        vm.end()


class Migration:
    def __init__(self, agent: Agent, vm: LocalVm, dest: str, opts: Options,
                 emit: progress.Emit) -> None:
        self.agent = agent
        self.vm = vm
        self.dest = dest
        self.opts = opts
        self.emit = emit
        self.id = uuid.uuid4().hex[:16]
        self.report = agent_pb2.MigrationReport(migration_id=self.id, vm=vm.name,
                                                source=agent.name, destination=dest,
                                                streams=opts.streams)
        self.t0 = time.monotonic()
        self.paused_at = 0.0
        self.was_paused = False
        self.began = False
        self.committed = False
        self.dest_prepared = False
        self.stub: agent_pb2_grpc.AgentStub | None = None
        self.channel: grpc.Channel | None = None

    def _ms(self, since: float) -> float:
        return (time.monotonic() - since) * 1000

    # ---------------------------------------------------------------- the run
    def run(self) -> agent_pb2.Progress:
        vm, agent = self.vm, self.agent
        memory: MappedMemory | None = None
        encoders: list[pages.Encoder] = []
        dirty_on = False
        pc: precopy.Precopy | None = None
        try:
            status = vm.status()
            if status.state not in (2, 3):          # RUNNING, PAUSED
                raise AgentError(f"{vm.name} is {status.state and STATES.get(status.state)}; "
                                 "only running or paused guests migrate")
            self.was_paused = status.state == 3
            self.emit(agent_pb2.Progress(phase="negotiate", message=f"contacting {self.dest}"))
            host = agent.store.get_host(self.dest)
            if not host.alive:
                raise AgentError(f"host {self.dest} is not alive (no heartbeat)",
                                 grpc.StatusCode.UNAVAILABLE)
            self.channel = channels.agent_channel(agent.cfg, host.address, self.dest)
            self.stub = agent_pb2_grpc.AgentStub(self.channel)
            faults.hold("source", "negotiate")
            version = self._negotiate()
            self.report.state_version = version
            agent.store.begin_migration(vm.name, self.id, agent.name, self.dest)
            self.began = True
            info = vm.client.memory()
            layout = pages.Layout.from_msg(info.layout)
            memory = MappedMemory(info)
            ranges = data_ranges(memory.fd, info.size)
            self._call("prepare", self.stub.Prepare, agent_pb2.PrepareRequest(
                migration_id=self.id, config=vm.config,
                populate=[agent_pb2.FileRange(offset=o, length=n) for o, n in ranges]))
            self.dest_prepared = True
            self.report.setup_ms = self._ms(self.t0)

            level = int(self.opts.compress) if self.opts.compress.lstrip("-").isdigit() \
                else pages.ZSTD_LEVEL
            encoders = [pages.Encoder(memory.map, layout, False, level)
                        for _ in range(self.opts.streams)]
            governor = CompressionGovernor(encoders, self.opts.compress, self.opts.bandwidth,
                                           level)
            sink = NetworkSink(self.channel, self.id, encoders, RateLimit(self.opts.bandwidth),
                               governor)
            vm.client.start_dirty_log()
            dirty_on = True
            t_log = time.monotonic()
            first = pages.bitmap_from_ranges(data_ranges(memory.fd, info.size), layout.pages)
            pc = precopy.Precopy(
                vmm=vm.client, layout=layout, sink=sink, policy=precopy.Policy(
                    downtime_ms=self.opts.downtime_ms, timeout_s=self.opts.timeout_s,
                    auto_converge=self.opts.auto_converge, max_rounds=30),
                cancel=vm.cancel, progress=self.emit, last_fetch=t_log)
            faults.hold("source", "precopy")
            last = pc.run(first, fresh_target=True)

            # ---- stop-and-copy
            self.emit(agent_pb2.Progress(phase="stop-and-copy", round=len(pc.rounds),
                                         bytes_remaining=pages.count_pages(last) * pages.PAGE))
            pre_console, console_end = vm.client.console_tail(CONSOLE_TAIL)
            self.paused_at = time.monotonic()
            step = Stopwatch(self.report.downtime_steps)
            paused = vm.client.pause_and_save("migration", console_from=console_end)
            self.report.pause_ms = paused.pause_ms
            step("pause_and_save")
            faults.hold("source", "stop-and-copy")
            final = np.bitwise_or(last, np.frombuffer(paused.dirty_bitmap, dtype=np.uint64))
            inline = self._last_pages(pc, sink, encoders[0], final)
            step("last_pages")
            state = translate.translate(paused.state, version)
            console = (pre_console + paused.console)[-CONSOLE_TAIL:]
            # The destination restores, commits the move in the store (the one
            # compare-and-swap that decides where the guest lives) and runs it.
            self._switchover(agent_pb2.SwitchoverRequest(
                migration_id=self.id, state=state, pages_sent=sink.pages_sent,
                chunks_sent=sink.chunks_sent, console_tail=console, last_pages=inline,
                stay_paused=self.was_paused), step)
            self.report.downtime_ms = self._ms(self.paused_at)
            self.report.outcome = "completed"
            self.report.compression = governor.summary()
            self._fill(pc, sink.counts)
            self.emit(agent_pb2.Progress(phase="committed",
                                         message=f"{vm.name} runs on {self.dest}"))
            self._teardown_source()
            self.report.total_ms = self._ms(self.t0)
            return agent_pb2.Progress(phase="done", migration=self.report)
        except BaseException as e:
            if self.committed:
                raise
            self._roll_back(e)
            raise self._user_error(e) from None
        finally:
            for enc in encoders:
                enc.close()
            if memory is not None:
                memory.close()
            if dirty_on and not self.committed:
                with contextlib.suppress(VmmError):
                    vm.client.stop_dirty_log()
            if pc is not None and not self.committed:
                with contextlib.suppress(VmmError):
                    pc.release_throttle()
            if self.channel is not None:
                self.channel.close()

    def _fill(self, pc: precopy.Precopy, counts: pages.Counts) -> None:
        r = self.report
        r.bytes_on_wire = pc.bytes_sent
        r.guest_bytes = counts.pages * pages.PAGE
        r.pages_zero, r.pages_raw = counts.pages_zero, counts.pages_raw
        r.pages_compressed = counts.pages_compressed
        r.max_throttle_percent = max((x.throttle for x in pc.rounds), default=0)
        for x in pc.rounds:
            r.rounds.append(agent_pb2.RoundStats(
                round=x.round, pages=x.pages, bytes_on_wire=x.bytes,
                duration_ms=x.seconds * 1000, dirty_pages_per_s=x.dirty_pages_per_s,
                throttle_percent=x.throttle))

    # ---------------------------------------------------------------- steps
    def _call(self, what: str, method: Callable, request: object,
              timeout: float = RPC_TIMEOUT_S) -> object:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            raise channels.rpc_error(f"{what} on {self.dest}", e) from None

    def _negotiate(self) -> int:
        vm = self.vm
        needs, why_not = translate.writable_versions(vm.config,
                                                     list(vm.status().features_in_use))
        _, _, flags = hostinfo.cpu_identity()
        reply = self._call("negotiate", self.stub.Negotiate, agent_pb2.NegotiateRequest(
            migration_id=self.id, vm=vm.name, source_host=self.agent.name,
            version=versions.version_info(), config=vm.config,
            needs=[agent_pb2.StateVersionFeatures(state_version=v, features=f)
                   for v, f in needs.items()],
            guest_cpu=agent_pb2.CpuInfo(flags=list(flags)),
            compressions=["raw", "zstd"]))
        if not reply.accepted:
            peer = reply.version
            # An older peer only says "no common version"; we know why.
            blocked = [why_not[v] for v in sorted(why_not)
                       if peer.state_version_min <= v <= peer.state_version_max]
            if blocked and not any(peer.state_version_min <= v <= peer.state_version_max
                                   for v in needs):
                raise Refused(f"{self.dest} runs vmigrate {peer.software_version} (state "
                              f"versions {peer.state_version_min}-{peer.state_version_max}) "
                              f"and {blocked[0]}")
            raise Refused(f"{self.dest} refused the migration: {reply.reason}")
        return reply.state_version

    def _last_pages(self, pc: precopy.Precopy, sink: NetworkSink, encoder: pages.Encoder,
                    final: np.ndarray) -> list[pb.MemoryChunk]:
        """The pages dirtied since the last round: inline in the switchover when
        they are few (no stream set-up on the downtime path), streamed if not."""
        n = pages.count_pages(final)
        if n > INLINE_PAGES_MAX:
            pc.send_round(len(pc.rounds), final, skip_zero=False)
            return []
        t0 = time.monotonic()
        chunks: list[pb.MemoryChunk] = []
        for batch in encoder.batches(final, sink.counts, skip_zero=False):
            chunks.extend(c.to_msg() for c in batch)
        size = sum(len(c.data) + 24 for c in chunks)
        pc.bytes_sent += size
        pc.rounds.append(precopy.RoundResult(len(pc.rounds), n, size,
                                             time.monotonic() - t0, 0.0, pc.throttle))
        return chunks

    def _switchover(self, request: agent_pb2.SwitchoverRequest, step: Stopwatch) -> None:
        try:
            reply = self._call("switchover", self.stub.Switchover, request)
            self.committed = bool(reply.committed)
            self.report.switchover_ms = step("switchover")
            for k, v in reply.steps.items():
                self.report.downtime_steps[f"destination_{k}"] = v
            return
        except AgentError as e:
            err = e
        # No usable answer: the store knows whether the destination committed.
        mig = _retry(lambda: self.agent.store.get_migration(self.vm.name))
        committed = (mig is not None and mig.migration_id == self.id  # type: ignore[union-attr]
                     and mig.state == store.MigrationState.COMMITTED)  # type: ignore[union-attr]
        if not committed:
            raise err
        self.committed = True
        self.report.switchover_ms = step("switchover")
        t = time.monotonic()
        while time.monotonic() - t < COMMIT_CONFIRM_S:
            with contextlib.suppress(grpc.RpcError):
                info = self.stub.GetVm(agent_pb2.VmRef(name=self.vm.name), timeout=5)
                if info.state in ("running", "paused"):
                    return
            time.sleep(0.5)
        raise AgentError(f"the move was committed but {self.dest} did not confirm the guest "
                         f"runs ({err}); the paused copy here is kept until it does")

    def _teardown_source(self) -> None:
        vm = self.vm
        with contextlib.suppress(Exception):
            self.agent.vms.destroy(vm, f"migrated to {self.dest}")
        with contextlib.suppress(store.StoreError):
            self.agent.store.finish_migration(vm.name, self.id)
        self.agent._update_info()

    def _roll_back(self, e: BaseException) -> None:
        """Before the commit: the guest stays (or starts again) here."""
        log.info("migration %s of %s failed before commit: %s", self.id, self.vm.name, e)
        if self.stub is not None and self.dest_prepared:
            with contextlib.suppress(grpc.RpcError):
                self.stub.Abort(agent_pb2.AbortRequest(migration_id=self.id, reason=str(e)),
                                timeout=5)
        if self.began:
            try:
                won = _retry(lambda: self.agent.store.abort_migration(self.vm.name, self.id))
            except store.StoreError:
                won = False
            if not won:
                mig = None
                with contextlib.suppress(store.StoreError):
                    mig = self.agent.store.get_migration(self.vm.name)
                if mig is not None and mig.state == store.MigrationState.COMMITTED:
                    # The destination's watchdog aborted nothing: the commit stands.
                    self.committed = True
                    return
            with contextlib.suppress(store.StoreError):
                self.agent.store.finish_migration(self.vm.name, self.id)
        if self.paused_at and not self.was_paused:
            with contextlib.suppress(VmmError):
                self.vm.client.resume()

    def _user_error(self, e: BaseException) -> BaseException:
        if isinstance(e, AgentError):
            if isinstance(e, Cancelled | Refused):
                return e
            return AgentError(f"migration of {self.vm.name} to {self.dest} failed: {e}; "
                              f"the guest keeps running on {self.agent.name}", e.code)
        if isinstance(e, store.StoreError | VmmError | ValueError):
            return AgentError(f"migration of {self.vm.name} to {self.dest} failed: {e}; "
                              f"the guest keeps running on {self.agent.name}")
        return e


def _retry(fn: Callable, attempts: int = 5, delay: float = 0.5) -> object:
    for i in range(attempts):
        try:
            return fn()
        except store.StoreUnavailable:
            if i == attempts - 1:
                raise
            time.sleep(delay)
    return None


def recover_source(agent: Agent, vm: LocalVm) -> None:
    """After an agent restart: a migration of this guest that the old agent
    never finished (no send can be running now). The store says how it ended;
    a pending one is aborted at once, so the guest can move again without
    waiting for the destination to give up."""
    try:
        st = vm.status()
    except VmmError:
        return
    # A checkpoint, like a migration, never outlives its agent: a guest it
    # paused runs again.
    paused_for_us = st.state == 3 and st.pause_reason in ("migration", "checkpoint")
    if st.state in (2, 3):
        # Whatever the old agent was doing (pre-copy throttling the vCPUs,
        # dirty logging for a migration or a checkpoint), no one finishes it now.
        with contextlib.suppress(VmmError):
            vm.client.set_throttle(0)
        with contextlib.suppress(VmmError):
            vm.client.stop_dirty_log()
    mig = agent.store.get_migration(vm.name)
    owner = agent.store.get_vm(vm.name).owner
    pending = (mig is not None and mig.src == agent.name
               and mig.state == store.MigrationState.PENDING)
    if not paused_for_us and not pending:
        return
    if pending and not agent.store.abort_migration(vm.name, mig.migration_id):
        mig = agent.store.get_migration(vm.name)
        owner = agent.store.get_vm(vm.name).owner
    if owner != agent.name:
        log.info("%s moved to %s while this agent was away: removing the old copy",
                 vm.name, owner)
        agent.vms.destroy(vm, f"migrated to {owner}")
        if mig is not None:
            with contextlib.suppress(store.StoreError):
                agent.store.finish_migration(vm.name, mig.migration_id)
        return
    log.info("%s stayed here (migration %s)", vm.name, mig.state if mig else "gone")
    if mig is not None:
        with contextlib.suppress(store.StoreError):
            agent.store.finish_migration(vm.name, mig.migration_id)
    if paused_for_us:
        vm.client.resume()
