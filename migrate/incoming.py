"""The destination side of a live migration (docs/protocol.md).

    NEGOTIATED --Prepare--> PREPARED --ReceiveMemory*--> PREPARED
      --Switchover: restore, COMMIT (store CAS), resume--> RUNNING (ours now)
    any state --Abort / bad data / failed commit / source gone quiet--> DISCARDED

The destination runs the guest only after its own compare-and-swap in the
cluster store moved the VM here; the source's abort is the competing CAS, so
exactly one side ever wins. If the guest cannot be resumed after the commit,
the move is rolled back in the store before the error is reported, and the
source takes its guest back. An agent that restarts finds a VMM still
waiting for its commit and settles it through the store.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from vmigrate.migrate import faults, pages, pagestream, store, translate, versions
from vmigrate.migrate.errors import AgentError
from vmigrate.migrate.progress import Stopwatch
from vmigrate.migrate.vms import LocalVm, check_vm_name
from vmigrate.proto import agent_pb2
from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm.client import MappedMemory, VmmError

if TYPE_CHECKING:
    from vmigrate.migrate.agent import Agent

log = logging.getLogger("vmigrate.incoming")

COMMIT_WAIT_S = 30.0        # after switchover, how long before asking the store ourselves
IDLE_TIMEOUT_S = 120.0      # a migration with no traffic for this long is discarded


class Phase(enum.Enum):
    NEGOTIATED = "negotiated"
    PREPARED = "prepared"
    SWITCHED = "switched"
    RUNNING = "running"
    DISCARDED = "discarded"


@dataclass
class Incoming:
    id: str
    vm_name: str
    source: str
    state_version: int
    config: pb.VmConfig
    phase: Phase = Phase.NEGOTIATED
    vm: LocalVm | None = None
    memory: MappedMemory | None = None
    layout: pages.Layout | None = None
    pages_received: int = 0
    chunks_received: int = 0
    bytes_received: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    switched_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: str = ""


def _features_ok(needs: list[agent_pb2.StateVersionFeatures],
                 lo: int, hi: int) -> tuple[int, str]:
    """The highest state version both sides can use, or 0 and why not."""
    offered = {n.state_version: list(n.features) for n in needs}
    common = [v for v in offered if lo <= v <= hi]
    if not common:
        return 0, (f"no common state version: the source writes "
                   f"{min(offered, default=0)}-{max(offered, default=0)}, this host reads "
                   f"{lo}-{hi}")
    for v in sorted(common, reverse=True):
        missing = [f for f in offered[v] if f not in versions.FEATURES]
        if not missing:
            return v, ""
    v = max(common)
    missing = [f for f in offered[v] if f not in versions.FEATURES]
    return 0, (f"the guest uses {', '.join(missing)}, which vmigrate "
               f"{versions.software_version()} on this host cannot restore")


class IncomingMigrations:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._by_id: dict[str, Incoming] = {}
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="incoming-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def active(self) -> bool:
        with self._lock:
            return any(m.phase not in (Phase.RUNNING, Phase.DISCARDED)
                       for m in self._by_id.values())

    def _get(self, migration_id: str) -> Incoming:
        with self._lock:
            m = self._by_id.get(migration_id)
        if m is None or m.phase == Phase.DISCARDED:
            why = f" ({m.error})" if m is not None and m.error else ""
            raise AgentError(f"no incoming migration {migration_id} on {self.agent.name}{why}",
                             grpc.StatusCode.NOT_FOUND)
        m.last_activity = time.monotonic()
        return m

    # ---------------------------------------------------------------- phases
    def negotiate(self, req: agent_pb2.NegotiateRequest,
                  context: grpc.ServicerContext) -> agent_pb2.NegotiateReply:
        agent = self.agent

        def refuse(reason: str) -> agent_pb2.NegotiateReply:
            return agent_pb2.NegotiateReply(accepted=False, reason=reason,
                                            version=versions.version_info())

        check_vm_name(req.vm)
        if agent.stopping.is_set():
            return refuse(f"{agent.name} is shutting down")
        version, why = _features_ok(list(req.needs), versions.STATE_VERSION_MIN,
                                    versions.STATE_VERSION_MAX)
        if not version:
            return refuse(why)
        try:
            agent.check_kvm()
        except AgentError as e:
            return refuse(str(e))
        self._drop_stale(req.vm)
        if req.vm in agent.vms:
            return refuse(f"{agent.name} already runs a VM named {req.vm}")
        with contextlib.suppress(store.NotFound):
            if not agent.store.get_host(agent.name).schedulable:
                return refuse(f"{agent.name} is drained (unschedulable)")
        from vmigrate.migrate import hostinfo

        _, _, flags = hostinfo.cpu_identity()
        missing = sorted(set(req.guest_cpu.flags) - set(flags))
        if missing:
            return refuse(f"this host's CPU lacks {', '.join(missing[:8])}, which the guest "
                          "was started with")
        host_khz = _host_tsc_khz()
        if (req.guest_cpu.tsc_khz and host_khz and not req.guest_cpu.tsc_scaling
                and abs(req.guest_cpu.tsc_khz - host_khz) * 1000 > host_khz):
            return refuse(f"the guest's TSC runs at {req.guest_cpu.tsc_khz} kHz, this host's "
                          f"at {host_khz} kHz and KVM here cannot scale it")
        info = agent.host_info()
        if req.config.memory_bytes > info.memory_available:
            return refuse(f"{agent.name} has {info.memory_available >> 20} MiB available, the "
                          f"guest needs {req.config.memory_bytes >> 20} MiB")
        with self._lock:
            if any(m.vm_name == req.vm and m.phase not in (Phase.RUNNING, Phase.DISCARDED)
                   for m in self._by_id.values()):
                return refuse(f"{req.vm} is already arriving on {agent.name}")
            self._by_id[req.migration_id] = Incoming(
                id=req.migration_id, vm_name=req.vm, source=req.source_host,
                state_version=version, config=req.config)
        return agent_pb2.NegotiateReply(
            accepted=True, state_version=version, version=versions.version_info(),
            compressions=["raw", "zstd"], max_streams=8)

    def prepare(self, req: agent_pb2.PrepareRequest,
                context: grpc.ServicerContext) -> agent_pb2.PrepareReply:
        t0 = time.monotonic()
        m = self._get(req.migration_id)
        with m.lock:
            if m.phase != Phase.NEGOTIATED:
                raise AgentError(f"migration {m.id} is {m.phase.value}, not negotiated")
            config = pb.VmConfig()
            config.CopyFrom(req.config if req.config.name else m.config)
            try:
                vm = self.agent.vms.spawn(config)
                vm.incoming_migration = m.id
                m.vm = vm
                info = vm.client.memory()
                m.memory = MappedMemory(info, writable=True)
                m.layout = pages.Layout.from_msg(info.layout)
                if req.populate:
                    m.memory.populate_async([(r.offset, r.length) for r in req.populate])
            except BaseException as e:
                self._discard(m, f"prepare failed: {e}")
                raise
            m.phase = Phase.PREPARED
        faults.hold("destination", "prepare")
        return agent_pb2.PrepareReply(prepare_ms=(time.monotonic() - t0) * 1000)

    def receive_memory(self, frames: Iterator[bytes],
                       context: grpc.ServicerContext) -> agent_pb2.MemoryAck:
        """One page stream (migrate/pagestream.py): frames of chunks, applied
        to the guest's memory as they arrive, every chunk checked first."""
        decoder: pages.Decoder | None = None
        m: Incoming | None = None
        pages_in = bytes_in = chunks_in = 0
        try:
            for frame in frames:
                header, chunks = pagestream.decode(frame)
                if m is None:
                    m = self._get(header.migration_id)
                    if m.phase != Phase.PREPARED or m.memory is None or m.layout is None:
                        raise AgentError(f"migration {m.id} is not ready for memory "
                                         f"({m.phase.value})")
                    decoder = pages.Decoder(m.memory.map, m.layout, fd=m.memory.fd)
                elif header.migration_id != m.id:
                    raise AgentError("a memory stream switched migrations",
                                     grpc.StatusCode.INVALID_ARGUMENT)
                assert decoder is not None
                if m.phase != Phase.PREPARED:
                    raise AgentError(f"migration {m.id} was {m.phase.value}: {m.error}",
                                     grpc.StatusCode.ABORTED)
                decoder.fresh = header.round == 0
                for chunk in chunks:
                    decoder.apply(chunk)
                    pages_in += chunk.pages
                    bytes_in += len(chunk.data)
                chunks_in += len(chunks)
                m.last_activity = time.monotonic()
        except (pages.BadChunk, pagestream.BadFrame) as e:
            if m is not None:
                self._discard(m, f"bad data from the source: {e}")
            raise AgentError(f"rejected the migration stream: {e}",
                             grpc.StatusCode.DATA_LOSS) from None
        finally:
            if decoder is not None:
                decoder.close()
            if m is not None:
                with m.lock:
                    m.pages_received += pages_in
                    m.bytes_received += bytes_in
                    m.chunks_received += chunks_in
        return agent_pb2.MemoryAck(pages=pages_in, bytes=bytes_in)

    def switchover(self, req: agent_pb2.SwitchoverRequest,
                   context: grpc.ServicerContext) -> agent_pb2.SwitchoverReply:
        """Last pages + state in; restore, commit in the store, run. On any
        failure the guest is discarded here and the error says so."""
        reply = agent_pb2.SwitchoverReply()
        step = Stopwatch(reply.steps)
        t_enter = step.last
        m = self._get(req.migration_id)
        with m.lock:
            if m.phase != Phase.PREPARED or m.vm is None or m.memory is None:
                raise AgentError(f"migration {m.id} is {m.phase.value}, not prepared")
            if req.pages_sent != m.pages_received or req.chunks_sent != m.chunks_received:
                why = (f"memory went missing: the source sent {req.chunks_sent} chunks "
                       f"({req.pages_sent} pages), {m.chunks_received} chunks "
                       f"({m.pages_received} pages) arrived")
                self._discard_locked(m, why)
                raise AgentError(why, grpc.StatusCode.DATA_LOSS)
            if req.state.state_version != m.state_version:
                why = (f"the source sent state version {req.state.state_version}, "
                       f"{m.state_version} was agreed")
                self._discard_locked(m, why)
                raise AgentError(why, grpc.StatusCode.INVALID_ARGUMENT)
            try:
                decoder = pages.Decoder(m.memory.map, m.layout, fd=m.memory.fd, fresh=False)
                for chunk in req.last_pages:
                    decoder.apply(chunk)
                decoder.close()
                step("last_pages")
                state = translate.translate(req.state, versions.STATE_VERSION_MAX)
                m.vm.client.restore(state, migration_id=m.id, console_history=req.console_tail)
                step("restore")
            except (pages.BadChunk, VmmError, translate.NotExpressible) as e:
                self._discard_locked(m, f"switchover failed: {e}")
                code = grpc.StatusCode.DATA_LOSS if isinstance(e, pages.BadChunk) else \
                    grpc.StatusCode.FAILED_PRECONDITION
                raise AgentError(f"the destination could not take the state: {e}", code) \
                    from None
            m.phase = Phase.SWITCHED
            m.switched_at = time.monotonic()
            faults.hold("destination", "switchover")
            self._commit_locked(m)
            step("store_commit")
            faults.hold("destination", "commit")
            self._run_locked(m, paused=req.stay_paused)
            step("resume")
        reply.committed = True
        reply.steps["total"] = (time.monotonic() - t_enter) * 1000
        # Unmapping guest memory takes milliseconds: do it off the downtime path.
        memory, m.memory = m.memory, None
        threading.Thread(target=self._after_switchover, args=(memory,), daemon=True).start()
        return reply

    def _after_switchover(self, memory: MappedMemory | None) -> None:
        if memory is not None:
            memory.close()
        self.agent._update_info()

    def _commit_locked(self, m: Incoming) -> None:
        """The compare-and-swap that moves the guest here; exactly one of it
        and the source's abort can succeed."""
        st = self.agent.store
        try:
            st.commit_migration(m.vm_name, m.id)
            return
        except store.StoreUnavailable:
            # The answer may be lost, not the commit: find out which.
            mig = None
            with contextlib.suppress(store.StoreError):
                mig = st.get_migration(m.vm_name)
            if mig is not None and mig.migration_id == m.id and \
                    mig.state == store.MigrationState.COMMITTED:
                return
            won_abort = False
            with contextlib.suppress(store.StoreError):
                won_abort = st.abort_migration(m.vm_name, m.id)
            if not won_abort:
                mig = st.get_migration(m.vm_name)   # let StoreUnavailable escape: unknown
                if mig is not None and mig.state == store.MigrationState.COMMITTED:
                    return
            self._discard_locked(m, "the cluster store could not record the move")
            raise AgentError("the cluster store could not record the move; the guest stays "
                             "at the source", grpc.StatusCode.UNAVAILABLE) from None
        except store.StoreError as e:
            self._discard_locked(m, f"commit refused: {e}")
            raise AgentError(f"the cluster store refused the move: {e}",
                             grpc.StatusCode.ABORTED) from None

    def _run_locked(self, m: Incoming, paused: bool = False) -> None:
        """Resume the committed guest here (or keep it paused, as it was at the
        source); if that fails, give it back."""
        vm = m.vm
        assert vm is not None
        try:
            if paused:
                vm.client.resume_paused()
            else:
                vm.client.resume()
        except VmmError as e:
            try:
                self.agent.store.rollback_migration(m.vm_name, m.id)
            except store.StoreError as se:
                log.error("migration %s: cannot run the guest (%s) nor roll back (%s)",
                          m.id, e, se)
                raise AgentError(f"the destination could not resume the guest ({e}) and the "
                                 f"store could not give it back ({se})") from None
            self._discard_locked(m, f"resume failed: {e}")
            raise AgentError(f"the destination could not resume the guest: {e}; the move "
                             "was rolled back", grpc.StatusCode.ABORTED) from None
        vm.incoming_migration = ""
        self.agent.vms.replace(vm)
        m.phase = Phase.RUNNING
        m.vm = None     # the registry has it now; the record stays small for its 600 s
        log.info("migration %s committed: %s runs here", m.id, m.vm_name)

    def abort(self, migration_id: str, reason: str) -> None:
        with self._lock:
            m = self._by_id.get(migration_id)
        if m is None:
            return
        with m.lock:
            if m.phase == Phase.RUNNING:
                raise AgentError(f"migration {migration_id} is already committed: the guest "
                                 f"runs on {self.agent.name}")
            self._discard_locked(m, reason or "aborted by the source")

    # ---------------------------------------------------------------- outcomes
    def _run_if_committed(self, m: Incoming) -> None:
        """Resume the guest here, but only if the store says it is ours."""
        mig = self.agent.store.get_migration(m.vm_name)
        if mig is None or mig.migration_id != m.id or mig.state != store.MigrationState.COMMITTED:
            raise AgentError(f"migration {m.id} is not committed in the cluster store "
                             f"({mig.state if mig else 'no record'}); not running the guest")
        self._run_locked(m)

    def _discard(self, m: Incoming, why: str) -> None:
        with m.lock:
            self._discard_locked(m, why)

    def _discard_locked(self, m: Incoming, why: str) -> None:
        if m.phase in (Phase.DISCARDED, Phase.RUNNING):
            return
        log.info("discarding incoming migration %s of %s: %s", m.id, m.vm_name, why)
        m.error = why
        m.phase = Phase.DISCARDED
        if m.memory is not None:
            m.memory.close()
            m.memory = None
        if m.vm is not None:
            with contextlib.suppress(Exception):
                self.agent.vms.destroy(m.vm, "incoming migration discarded")
            m.vm = None

    def _drop_stale(self, vm_name: str) -> None:
        """Discard a half-arrived copy of `vm_name` whose migration the store
        no longer has as pending (the source gave up, maybe while unreachable)."""
        with self._lock:
            stale = [m for m in self._by_id.values() if m.vm_name == vm_name
                     and m.phase in (Phase.NEGOTIATED, Phase.PREPARED)]
        for m in stale:
            self._discard_if_abandoned(m)

    def _discard_if_abandoned(self, m: Incoming) -> None:
        try:
            mig = self.agent.store.get_migration(m.vm_name)
        except store.StoreError:
            return
        if mig is None or mig.migration_id != m.id or mig.state in (
                store.MigrationState.ABORTED, store.MigrationState.ROLLED_BACK):
            self._discard(m, "the source abandoned the migration")

    def _watch(self) -> None:
        """Settle migrations whose source went quiet or gave up."""
        polled = 0.0
        while not self._stop.wait(1.0):
            with self._lock:
                items = list(self._by_id.values())
            now = time.monotonic()
            if now - polled > 2.0:
                polled = now
                for m in items:
                    if m.phase in (Phase.NEGOTIATED, Phase.PREPARED) and \
                            now - m.last_activity > 2.0:
                        self._discard_if_abandoned(m)
            for m in items:
                waited_commit = (m.phase == Phase.SWITCHED
                                 and now - m.switched_at > COMMIT_WAIT_S)
                went_idle = (m.phase in (Phase.NEGOTIATED, Phase.PREPARED)
                             and now - m.last_activity > IDLE_TIMEOUT_S)
                if waited_commit or went_idle:
                    self._settle(m)
                elif m.phase in (Phase.RUNNING, Phase.DISCARDED) and now - m.last_activity > 600:
                    with self._lock:
                        self._by_id.pop(m.id, None)

    def _settle(self, m: Incoming) -> None:
        """Decide a migration the source did not finish, through the store."""
        try:
            mig = self.agent.store.get_migration(m.vm_name)
            with m.lock:
                if m.phase not in (Phase.SWITCHED, Phase.NEGOTIATED, Phase.PREPARED):
                    return
                if (mig is not None and mig.migration_id == m.id
                        and mig.state == store.MigrationState.COMMITTED
                        and m.phase == Phase.SWITCHED):
                    self._run_if_committed(m)
                    return
                pending = (mig is not None and mig.migration_id == m.id
                           and mig.state == store.MigrationState.PENDING)
                if pending and not self.agent.store.abort_migration(m.vm_name, m.id):
                    if m.phase == Phase.SWITCHED:
                        self._run_if_committed(m)     # the commit won the race
                    return
                self._discard_locked(m, "the source went quiet; aborted through the store")
        except (store.StoreError, AgentError) as e:
            log.warning("cannot settle migration %s yet: %s", m.id, e)

    def recover(self, vm: LocalVm) -> None:
        """After an agent restart: a VMM still waiting for a commit."""
        if not vm.incoming_migration:
            return
        m = Incoming(id=vm.incoming_migration, vm_name=vm.name, source="?",
                     state_version=versions.STATE_VERSION_MAX, config=vm.config,
                     phase=Phase.SWITCHED, vm=vm, switched_at=0.0)
        with self._lock:
            self._by_id[m.id] = m
        self._settle(m)

    def close(self) -> None:
        self._stop.set()


def _host_tsc_khz() -> int:
    from vmigrate.vmm import kvm

    try:
        k = kvm.Kvm()
        try:
            vm_fd = kvm.ioctl_int(k.fd, kvm.KVM_CREATE_VM, 0)
            try:
                return kvm.ioctl_int(vm_fd, kvm.KVM_GET_TSC_KHZ)
            finally:
                import os

                os.close(vm_fd)
        finally:
            k.close()
    except (OSError, kvm.KvmError):
        return 0
