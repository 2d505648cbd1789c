"""The node agent (vmigrated): runs this host's guests and moves them.

It serves proto/agent.proto. The CLI calls the first group of methods; other
agents call the migration methods (the destination side, migrate/incoming.py).
Long operations live in their own modules (checkpoint, outgoing migration);
this module wires requests to them and keeps the host registered in the
cluster store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from vmigrate.migrate import hostinfo, store, versions
from vmigrate.migrate.errors import AgentError, streaming, unary
from vmigrate.migrate.vms import STATE_NAMES, LocalVm, VmRegistry, check_vm_name
from vmigrate.proto import agent_pb2, agent_pb2_grpc, vmm_pb2
from vmigrate.proto import state_pb2 as pb
from vmigrate.vmm import kvm
from vmigrate.vmm.client import VmmError

log = logging.getLogger("vmigrate.agent")

HOST_TTL_S = 10.0
AGENT_INFO = "agent.json"
MAX_MESSAGE = 64 << 20
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.so_reuseport", 0),
    # Peers ping every 5 s (migrate/channels.py) to notice a dead link fast;
    # accept that instead of answering with GOAWAY "too_many_pings".
    ("grpc.http2.min_ping_interval_without_data_ms", 4000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
]


def _authz_policy() -> object:
    """Only agents may push a migration into an agent; the CLI (client
    certificates) may call everything else."""
    from vmigrate.migrate import authz

    agent_only = ["Negotiate", "Prepare", "Switchover", "Abort"]
    rules = {f"/vmigrate.v1.Agent/{m}": authz.AGENT_ONLY for m in agent_only}
    rules["/vmigrate.v1.PageStream/Push"] = authz.AGENT_ONLY
    return authz.MethodPolicy(rules, default=authz.ANY_ROLE)


AUTHZ_POLICY = _authz_policy()


@dataclass
class AgentConfig:
    name: str
    listen: str
    state_dir: Path
    store_url: str
    advertise: str = ""
    tls_dir: Path | None = None       # agent certificate directory (mTLS); None: plaintext
    insecure: bool = False            # plaintext explicitly allowed
    idle_exit_s: float = 0.0          # exit when no guest ran for this long (on-demand agent)
    standby_vmms: int = 1             # VMM processes kept started ahead of need


class Agent(agent_pb2_grpc.AgentServicer):
    def __init__(self, cfg: AgentConfig, store_: store.ClusterStore) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.store = store_
        self.vms = VmRegistry(cfg.state_dir, cfg.standby_vmms)
        self.address = cfg.advertise or cfg.listen
        self.stopping = threading.Event()
        self.last_call = time.monotonic()     # for the on-demand agent's idle exit
        self._heartbeat: store.Heartbeat | None = None
        self._kvm_checked: str | None = None
        from vmigrate.migrate.incoming import IncomingMigrations

        self.incoming = IncomingMigrations(self)

    # ---------------------------------------------------------------- lifecycle
    def register(self) -> None:
        self.store.register_host(self.name, self.address, self.host_info_dict(), HOST_TTL_S)
        self._heartbeat = store.Heartbeat(self.store, self.name, HOST_TTL_S / 3,
                                          on_lost=self._lease_lost).start()

    def _lease_lost(self, name: str) -> None:
        """Our lease expired (store unreachable for too long): we cannot have
        claimed anything meanwhile; register again and carry on."""
        log.warning("lease of %s lost; registering again", name)
        if self.stopping.is_set():
            return
        try:
            self.register()
        except store.StoreError as e:
            log.error("cannot register again: %s", e)

    def adopt(self) -> None:
        from vmigrate.migrate.upgrade import settle_interrupted

        # First any same-host upgrade a previous agent left half-done, so that
        # exactly one VMM per guest is adopted below.
        for note in settle_interrupted(self.vms.root):
            log.info("%s", note)
        adopted, removed = self.vms.adopt_existing()
        from vmigrate.migrate.outgoing import recover_source

        for vm in adopted:
            log.info("re-attached to %s (pid %d)", vm.name, vm.pid)
            try:
                if vm.incoming_migration:
                    self.incoming.recover(vm)
                elif not self._drop_if_never_started(vm):
                    recover_source(self, vm)
            except (store.StoreError, VmmError, AgentError) as e:
                log.error("cannot settle %s yet: %s", vm.name, e)
        for name in removed:
            log.info("removed the remains of %s", name)

    def _drop_if_never_started(self, vm: LocalVm) -> bool:
        """A VMM that never ran its guest (CREATED): the previous agent died
        while preparing it, as a migration's destination or for a run or a
        restore. Nothing can finish that now, and keeping it would show a
        second copy of the guest and block its next migration here."""
        if vm.client.status(timeout=5).state != vmm_pb2.VmmStatus.CREATED:
            return False
        log.info("%s: removing a VMM that never started (its agent died while preparing it)",
                 vm.name)
        self.vms.destroy(vm, "never started")
        with contextlib.suppress(store.StoreError):
            if self.store.get_vm(vm.name).owner == self.name:
                self.store.delete_vm(vm.name, self.name)
        return True

    def host_info_dict(self) -> dict:
        info = self.host_info()
        return {"version": info.version.software_version,
                "state_versions": [info.version.state_version_min,
                                   info.version.state_version_max],
                "memory_total": info.memory_total, "memory_available": info.memory_available,
                "cpus": info.cpus, "vms": info.vm_count,
                "user_space": info.runs_guest_user_space}

    def host_info(self) -> agent_pb2.HostInfo:
        _vendor, model, flags = hostinfo.cpu_identity()
        reserved = sum(vm.config.memory_bytes for vm in self.vms.all())
        probe_ok, probe_detail = self.user_space_probe()
        try:
            schedulable = self.store.get_host(self.name).schedulable
        except store.StoreError:
            schedulable = True
        return agent_pb2.HostInfo(
            name=self.name, address=self.address, version=versions.version_info(),
            memory_total=hostinfo.memory_total(),
            memory_available=max(0, hostinfo.memory_available() - reserved),
            cpus=hostinfo.cpu_count(), cpu_model=model, cpu_flags=list(flags),
            vm_count=len(self.vms.all()), schedulable=schedulable,
            runs_guest_user_space=probe_ok, user_space_probe_detail=probe_detail)

    def user_space_probe(self) -> tuple[bool, str]:
        from vmigrate.vmm import probe

        return probe.cached_result(self.cfg.state_dir)

    def check_kvm(self) -> None:
        if self._kvm_checked is None:
            try:
                k = kvm.Kvm()
                k.require_capabilities()
                k.close()
                self._kvm_checked = ""
            except kvm.KvmError as e:
                self._kvm_checked = str(e)
        if self._kvm_checked:
            raise AgentError(self._kvm_checked)

    def vm_info(self, vm: LocalVm) -> agent_pb2.VmInfo:
        try:
            st = vm.status()
            state = STATE_NAMES.get(st.state, "unknown")
            detail, uptime, exits, config = st.detail, st.uptime_s, st.exits, st.config
        except VmmError as e:
            state, detail, uptime, exits, config = "lost", str(e), 0.0, 0, vm.config
        if vm.incoming_migration:
            state = "incoming"
        return agent_pb2.VmInfo(name=vm.name, host=self.name, state=state, config=config,
                                pid=vm.pid, detail=detail, uptime_s=uptime, exits=exits,
                                operation=vm.operation)

    # ---------------------------------------------------------------- CLI calls
    @unary
    def GetHostInfo(self, request: agent_pb2.AgentEmpty,
                    context: grpc.ServicerContext) -> agent_pb2.HostInfo:
        return self.host_info()

    @unary
    def RunVm(self, request: agent_pb2.RunVmRequest,
              context: grpc.ServicerContext) -> agent_pb2.VmInfo:
        config = request.config
        check_vm_name(config.name)
        self.check_kvm()
        self._check_schedulable()
        self.store.create_vm(config.name, self.name, {"memory_bytes": config.memory_bytes,
                                                      "vcpus": config.vcpu_count})
        try:
            vm = self.vms.spawn(config)
        except BaseException:
            with contextlib.suppress(store.StoreError):
                self.store.delete_vm(config.name, self.name)
            raise
        try:
            if not request.paused:
                vm.client.boot()
        except BaseException:
            self.vms.destroy(vm, "boot failed")
            with contextlib.suppress(store.StoreError):
                self.store.delete_vm(config.name, self.name)
            raise
        self._update_info()
        return self.vm_info(vm)

    def _check_schedulable(self) -> None:
        with contextlib.suppress(store.NotFound):
            if not self.store.get_host(self.name).schedulable:
                raise AgentError(f"host {self.name} is drained (unschedulable): "
                                 f"run 'vmigrate undrain {self.name}' first")

    @unary
    def ListVms(self, request: agent_pb2.AgentEmpty,
                context: grpc.ServicerContext) -> agent_pb2.VmList:
        return agent_pb2.VmList(vms=[self.vm_info(vm) for vm in self.vms.all()])

    @unary
    def GetVm(self, request: agent_pb2.VmRef, context: grpc.ServicerContext) -> agent_pb2.VmInfo:
        return self.vm_info(self.vms.get(request.name))

    @streaming
    def ReadConsole(self, request: agent_pb2.ReadConsoleRequest,
                    context: grpc.ServicerContext) -> Iterator[agent_pb2.ConsoleChunk]:
        vm = self.vms.get(request.name)
        for data in vm.client.console_read(follow=request.follow, tail_bytes=request.tail_bytes,
                                           only_new=request.only_new):
            if not context.is_active():
                return
            yield agent_pb2.ConsoleChunk(data=data)

    @unary
    def WriteConsole(self, request: agent_pb2.WriteConsoleRequest,
                     context: grpc.ServicerContext) -> agent_pb2.AgentEmpty:
        self.vms.get(request.name).client.console_write(request.data)
        return agent_pb2.AgentEmpty()

    @unary
    def PauseVm(self, request: agent_pb2.VmRef,
                context: grpc.ServicerContext) -> agent_pb2.VmInfo:
        vm = self.vms.get(request.name)
        self._not_busy(vm)
        vm.client.pause()
        return self.vm_info(vm)

    @unary
    def ResumeVm(self, request: agent_pb2.VmRef,
                 context: grpc.ServicerContext) -> agent_pb2.VmInfo:
        vm = self.vms.get(request.name)
        self._not_busy(vm)
        vm.client.resume()
        return self.vm_info(vm)

    def _not_busy(self, vm: LocalVm) -> None:
        if vm.operation:
            raise AgentError(f"{vm.name} is busy: {vm.operation} in progress",
                             grpc.StatusCode.ABORTED)
        if vm.incoming_migration:
            raise AgentError(f"{vm.name} is arriving by migration", grpc.StatusCode.ABORTED)

    @unary
    def StopVm(self, request: agent_pb2.VmRef,
               context: grpc.ServicerContext) -> agent_pb2.AgentEmpty:
        vm = self.vms.get(request.name)
        self._not_busy(vm)
        vm.begin("stop")
        try:
            self.vms.destroy(vm, "stopped by the user")
            with contextlib.suppress(store.NotFound):
                self.store.delete_vm(vm.name, self.name)
        finally:
            vm.end()
        self._update_info()
        return agent_pb2.AgentEmpty()

    @unary
    def Cancel(self, request: agent_pb2.VmRef,
               context: grpc.ServicerContext) -> agent_pb2.AgentEmpty:
        vm = self.vms.get(request.name)
        if not vm.operation:
            raise AgentError(f"nothing to cancel: no operation in progress on {vm.name}")
        vm.cancel.set()
        return agent_pb2.AgentEmpty()

    @streaming
    def Checkpoint(self, request: agent_pb2.CheckpointRequest,
                   context: grpc.ServicerContext) -> Iterator[agent_pb2.Progress]:
        from vmigrate.migrate import checkpoint

        yield from checkpoint.checkpoint_vm(self, request, context)

    @streaming
    def Restore(self, request: agent_pb2.RestoreRequest,
                context: grpc.ServicerContext) -> Iterator[agent_pb2.Progress]:
        from vmigrate.migrate import checkpoint

        yield from checkpoint.restore_vm(self, request, context)

    @streaming
    def Send(self, request: agent_pb2.SendRequest,
             context: grpc.ServicerContext) -> Iterator[agent_pb2.Progress]:
        from vmigrate.migrate.outgoing import send_vm

        yield from send_vm(self, request, context)

    @streaming
    def Upgrade(self, request: agent_pb2.VmRef,
                context: grpc.ServicerContext) -> Iterator[agent_pb2.Progress]:
        from vmigrate.migrate.upgrade import upgrade_vm

        yield from upgrade_vm(self, request, context)

    @unary
    def ShutdownAgent(self, request: agent_pb2.ShutdownAgentRequest,
                      context: grpc.ServicerContext) -> agent_pb2.AgentEmpty:
        if request.stop_vms:
            for vm in self.vms.all():
                with contextlib.suppress(Exception):
                    self.vms.destroy(vm, "agent shut down")
                    self.store.delete_vm(vm.name, self.name)
        self.stopping.set()
        return agent_pb2.AgentEmpty()

    # ---------------------------------------------------------------- migration (destination)
    @unary
    def Negotiate(self, request: agent_pb2.NegotiateRequest,
                  context: grpc.ServicerContext) -> agent_pb2.NegotiateReply:
        return self.incoming.negotiate(request, context)

    @unary
    def Prepare(self, request: agent_pb2.PrepareRequest,
                context: grpc.ServicerContext) -> agent_pb2.PrepareReply:
        return self.incoming.prepare(request, context)

    @unary
    def ReceivePages(self, frames: Iterator[bytes],
                     context: grpc.ServicerContext) -> agent_pb2.MemoryAck:
        return self.incoming.receive_memory(frames, context)

    @unary
    def Switchover(self, request: agent_pb2.SwitchoverRequest,
                   context: grpc.ServicerContext) -> agent_pb2.SwitchoverReply:
        return self.incoming.switchover(request, context)

    @unary
    def Abort(self, request: agent_pb2.AbortRequest,
              context: grpc.ServicerContext) -> agent_pb2.AgentEmpty:
        self.incoming.abort(request.migration_id, request.reason)
        return agent_pb2.AgentEmpty()

    # ---------------------------------------------------------------- helpers
    def _update_info(self) -> None:
        with contextlib.suppress(store.StoreError):
            self.store.update_host_info(self.name, self.host_info_dict())

    def close(self) -> None:
        self.stopping.set()
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self.incoming.close()
        self.vms.close()


def serve(cfg: AgentConfig) -> None:
    """Run the agent until SIGTERM/SIGINT or ShutdownAgent."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = store.open_store(cfg.store_url)
    from vmigrate.migrate import authz, pagestream

    interceptors = [authz.AuthzInterceptor(AUTHZ_POLICY, insecure_plaintext=cfg.tls_dir is None)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="rpc"),
                         options=GRPC_OPTIONS, interceptors=interceptors)
    agent = Agent(cfg, st)
    agent_pb2_grpc.add_AgentServicer_to_server(agent, server)
    server.add_generic_rpc_handlers([pagestream.handler(agent.ReceivePages)])
    port = _add_port(server, cfg)
    if not cfg.advertise:
        if cfg.listen.startswith("unix:"):
            agent.address = cfg.listen
        else:
            agent.address = f"{cfg.listen.rsplit(':', 1)[0]}:{port}"
    if port == 0 and not cfg.listen.startswith("unix:"):
        raise AgentError(f"cannot listen on {cfg.listen}")
    agent.adopt()
    agent.vms.standby.refill()
    server.start()
    agent.register()
    (cfg.state_dir / "agent.pid").write_text(f"{os.getpid()}\n")
    info = {"name": cfg.name, "pid": os.getpid(), "address": agent.address,
            "version": versions.software_version(), "store": cfg.store_url}
    tmp = cfg.state_dir / (AGENT_INFO + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(cfg.state_dir / AGENT_INFO)
    log.info("agent %s serving on %s (store %s)", cfg.name, agent.address, cfg.store_url)

    def on_signal(_sig: int, _frame: object) -> None:
        agent.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not agent.stopping.wait(0.5):
            if cfg.idle_exit_s:
                if agent.vms.all() or agent.incoming.active():
                    agent.last_call = time.monotonic()
                elif time.monotonic() - agent.last_call > cfg.idle_exit_s:
                    log.info("no guests and no calls for %.0f s: exiting", cfg.idle_exit_s)
                    break
    finally:
        # Say we are gone before we go: a client must start a new agent rather
        # than talk to this one while it shuts down.
        with contextlib.suppress(FileNotFoundError):
            (cfg.state_dir / AGENT_INFO).unlink()
        server.stop(grace=1.0).wait(3)
        agent.close()
        with contextlib.suppress(store.StoreError):
            # An empty host leaves the cluster; a drained one stays known (and
            # drained), so it comes back drained after an upgrade's restart.
            if not agent.vms.all() and st.get_host(cfg.name).schedulable:
                st.deregister_host(cfg.name)
        st.close()
        for name in (AGENT_INFO, "agent.pid"):
            with contextlib.suppress(FileNotFoundError):
                (cfg.state_dir / name).unlink()


def _add_port(server: grpc.Server, cfg: AgentConfig) -> int:
    from vmigrate.migrate import pki

    if cfg.tls_dir is None:
        if not cfg.insecure:
            raise AgentError("no TLS certificates given (--tls-dir); plaintext needs --insecure")
        return pki.add_server_port(server, cfg.listen, None, insecure_plaintext=True)
    paths = pki.CertPaths.in_dir(cfg.tls_dir, "agent", cfg.name)
    return pki.add_server_port(server, cfg.listen, paths)


def vm_config_summary(c: pb.VmConfig) -> str:
    kind = c.WhichOneof("guest") or "?"
    return f"{kind}, {c.memory_bytes >> 20} MiB, {c.vcpu_count} vCPU"
