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
    hostinfo,
    pages,
    precopy,
    progress,
    store,
    translate,
    versions,
)
from vmigrate.migrate.errors import AgentError, Cancelled, Refused
from vmigrate.migrate.vms import LocalVm
from vmigrate.proto import agent_pb2, agent_pb2_grpc
from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm.client import MappedMemory, VmmError
from vmigrate.vmm.memory import data_ranges

if TYPE_CHECKING:
    from vmigrate.migrate.agent import Agent

log = logging.getLogger("vmigrate.outgoing")

RPC_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 600.0
COMMIT_CONFIRM_S = 60.0
DEFAULT_STREAMS = 2
CONSOLE_TAIL = 64 << 10
BLOCK_WORDS = 4                   # 256 pages: the unit streams share work in


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

    def __init__(self, stub: agent_pb2_grpc.AgentStub, migration_id: str,
                 encoders: list[pages.Encoder], limit: RateLimit) -> None:
        self.stub = stub
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

        def batches() -> Iterator[agent_pb2.MemoryBatch]:
            for chunks in self.encoders[i].batches(bitmap, local, skip_zero=skip_zero):
                size = sum(len(c.data) for c in chunks)
                self.limit.take(size)
                sent[0] += size + 16 * len(chunks)
                with self._lock:
                    self.chunks_sent += len(chunks)
                    self.pages_sent += sum(c.page_count for c in chunks)
                    self.counts.add(local)
                    local.__init__()
                yield agent_pb2.MemoryBatch(migration_id=self.id, round=round_, chunks=chunks)
                tick()
        try:
            self.stub.ReceiveMemory(batches(), timeout=STREAM_TIMEOUT_S)
            results[i] = sent[0]
        except grpc.RpcError as e:
            results[i] = channels.rpc_error("memory stream", e)
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
        dirty_on = False
        pc: precopy.Precopy | None = None
        try:
            status = vm.status()
            if status.state != 2:
                raise AgentError(f"{vm.name} is not running; only running guests migrate")
            self.emit(agent_pb2.Progress(phase="negotiate", message=f"contacting {self.dest}"))
            host = agent.store.get_host(self.dest)
            if not host.alive:
                raise AgentError(f"host {self.dest} is not alive (no heartbeat)",
                                 grpc.StatusCode.UNAVAILABLE)
            self.channel = channels.agent_channel(agent.cfg, host.address, self.dest)
            self.stub = agent_pb2_grpc.AgentStub(self.channel)
            version = self._negotiate()
            self.report.state_version = version
            agent.store.begin_migration(vm.name, self.id, agent.name, self.dest)
            self.began = True
            self._call("prepare", self.stub.Prepare, agent_pb2.PrepareRequest(
                migration_id=self.id, config=vm.config))
            self.dest_prepared = True
            self.report.setup_ms = self._ms(self.t0)

            info = vm.client.memory()
            layout = pages.Layout.from_msg(info.layout)
            memory = MappedMemory(info)
            compress = self._compress_decision(memory, layout)
            level = int(self.opts.compress) if self.opts.compress.lstrip("-").isdigit() \
                else pages.ZSTD_LEVEL
            encoders = [pages.Encoder(memory.map, layout, compress, level)
                        for _ in range(self.opts.streams)]
            sink = NetworkSink(self.stub, self.id, encoders, RateLimit(self.opts.bandwidth))
            vm.client.start_dirty_log()
            dirty_on = True
            t_log = time.monotonic()
            first = pages.bitmap_from_ranges(data_ranges(memory.fd, info.size), layout.pages)
            pc = precopy.Precopy(
                vmm=vm.client, layout=layout, sink=sink, policy=precopy.Policy(
                    downtime_ms=self.opts.downtime_ms, timeout_s=self.opts.timeout_s,
                    auto_converge=self.opts.auto_converge, max_rounds=30),
                cancel=vm.cancel, progress=self.emit, last_fetch=t_log)
            last = pc.run(first, fresh_target=True)

            # ---- stop-and-copy
            self.emit(agent_pb2.Progress(phase="stop-and-copy", round=len(pc.rounds),
                                         bytes_remaining=pages.count_pages(last) * pages.PAGE))
            self.paused_at = time.monotonic()
            self.report.pause_ms = vm.client.pause()
            final = np.bitwise_or(last, vm.client.fetch_dirty_log())
            pc.send_round(len(pc.rounds), final, skip_zero=False)
            state = translate.translate(vm.client.save(), version)
            console = b"".join(vm.client.console_read(tail_bytes=CONSOLE_TAIL))
            vm.client.stop_dirty_log()
            dirty_on = False
            pc.release_throttle()
            t_sw = time.monotonic()
            self._call("switchover", self.stub.Switchover, agent_pb2.SwitchoverRequest(
                migration_id=self.id, state=state, pages_sent=sink.pages_sent,
                chunks_sent=sink.chunks_sent, console_tail=console))
            self.report.switchover_ms = self._ms(t_sw)

            # ---- commit: one compare-and-swap decides where the guest lives
            self._commit()
            self.report.downtime_ms = self._ms(self.paused_at)
            self.report.outcome = "completed"
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
            encoders = []
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
        needs = []
        for v in range(versions.STATE_VERSION_MAX, versions.STATE_VERSION_MIN - 1, -1):
            try:
                s = translate.translate(pb.VmState(state_version=versions.STATE_VERSION_MAX,
                                                   config=vm.config), v)
            except translate.NotExpressible:
                continue
            needs.append(agent_pb2.StateVersionFeatures(state_version=v,
                                                        features=s.required_features))
        _, _, flags = hostinfo.cpu_identity()
        reply = self._call("negotiate", self.stub.Negotiate, agent_pb2.NegotiateRequest(
            migration_id=self.id, vm=vm.name, source_host=self.agent.name,
            version=versions.version_info(), needs=needs, config=vm.config,
            guest_cpu=agent_pb2.CpuInfo(flags=list(flags)),
            compressions=["raw", "zstd"]))
        if not reply.accepted:
            raise Refused(f"{self.dest} refused the migration: {reply.reason}")
        return reply.state_version

    def _compress_decision(self, memory: MappedMemory, layout: pages.Layout) -> bool:
        c = self.opts.compress
        if c == "off":
            self.report.compression = "off"
            return False
        if c != "auto":
            self.report.compression = f"zstd level {c}"
            return True
        # Compression pays only when the link, not the CPU, is the bottleneck.
        decision = channels.compression_pays(self.opts.bandwidth, self.opts.streams)
        self.report.compression = "zstd (auto)" if decision else "raw (auto)"
        return decision

    def _commit(self) -> None:
        st = self.agent.store
        try:
            st.commit_migration(self.vm.name, self.id)
        except store.StoreUnavailable:
            # The answer was lost, not necessarily the commit: read it back.
            mig = _retry(lambda: st.get_migration(self.vm.name))
            if mig is None or mig.migration_id != self.id or \
                    mig.state != store.MigrationState.COMMITTED:
                raise
        self.committed = True
        t = time.monotonic()
        try:
            self._call("commit", self.stub.Commit,
                       agent_pb2.CommitRequest(migration_id=self.id), timeout=10)
            return
        except AgentError as e:
            if "discarded" in str(e):
                # The destination could not run it and will not: take it back.
                st.rollback_migration(self.vm.name, self.id)
                self.committed = False
                raise AgentError(f"{self.dest} could not start the guest; it keeps running "
                                 f"on {self.agent.name}: {e}") from None
            err = e
        # No answer: the destination decides through the store on its own;
        # wait until we know it runs the guest before destroying our copy.
        while time.monotonic() - t < COMMIT_CONFIRM_S:
            with contextlib.suppress(AgentError, grpc.RpcError):
                info = self.stub.GetVm(agent_pb2.VmRef(name=self.vm.name), timeout=5)
                if info.state in ("running", "paused"):
                    return
            time.sleep(0.5)
        raise AgentError(f"migration committed but {self.dest} did not confirm the guest runs "
                         f"({err}); the paused source copy is kept until it does")

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
        if self.paused_at:
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
