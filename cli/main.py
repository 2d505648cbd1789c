"""vmigrate: run, move, checkpoint and restore KVM guests. See `vmigrate --help`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from vmigrate.cli import output
from vmigrate.cli.context import (
    LOCAL_HOST,
    CliError,
    ClusterConfig,
    connect_agent,
    load_cluster,
    open_cluster_store,
    stub_for,
)
from vmigrate.cli.sizes import human_bytes, parse_rate, parse_size
from vmigrate.migrate import store
from vmigrate.proto import agent_pb2, agent_pb2_grpc
from vmigrate.proto import state_pb2 as pb

DESCRIPTION = """\
vmigrate moves running virtual machines: live migration between hosts,
checkpoint/restore to files, and rolling host upgrades. Each host runs an
agent (vmigrated) that runs its guests in vmigrate's own small KVM VMM.
"""

EPILOG = """\
getting started (one machine, two hosts):
  vmigrate up                          start agents host1 and host2 here
  vmigrate run vm1 --test-guest        boot the built-in test guest
  vmigrate logs vm1                    its console: heartbeats, self-checks
  vmigrate send host2 vm1              live-migrate it to host2
  vmigrate ps                          where everything runs
  vmigrate down                        stop the cluster and its guests

Without `vmigrate up`, commands start a single local agent on demand.
Sizes take K/M/G/T suffixes (powers of 1024): 64M, 1G. Rates: 50M, 50MiB/s,
100Mbit/s. Set VMIGRATE_HOME to keep vmigrate's files elsewhere.
"""


# ---------------------------------------------------------------- agent access


class Session:
    """The cluster as the CLI sees it: where hosts are, and channels to them."""

    def __init__(self) -> None:
        self.cfg: ClusterConfig | None = load_cluster()
        self._store: store.ClusterStore | None = None
        self._channels: dict[str, grpc.Channel] = {}

    @property
    def local_mode(self) -> bool:
        return self.cfg is None

    @property
    def store(self) -> store.ClusterStore:
        if self._store is None:
            if self.cfg is None:
                from vmigrate.cli.cluster import local_store_url

                self._store = store.open_store(local_store_url())
            else:
                self._store = open_cluster_store(self.cfg)
        return self._store

    def hosts(self) -> list[store.HostRecord]:
        if self.local_mode:
            self.agent(LOCAL_HOST)
        return self.store.list_hosts()

    def agent(self, host: str, start: bool = True) -> agent_pb2_grpc.AgentStub:
        if host in self._channels:
            return stub_for(self._channels[host])
        if self.cfg is None:
            if host != LOCAL_HOST:
                raise CliError(f"unknown host {host!r}: no cluster is set up here "
                               "(start one with 'vmigrate up'); the local host is 'local'")
            from vmigrate.cli.cluster import ensure_local_agent, local_address

            address = ensure_local_agent() if start else local_address()
        else:
            try:
                rec = self.store.get_host(host)
            except store.HostNotFound:
                known = ", ".join(h.name for h in self.store.list_hosts()) or "none"
                raise CliError(f"unknown host {host!r} (known hosts: {known})") from None
            if not rec.alive:
                raise CliError(f"host {host} is not running (its agent stopped sending "
                               "heartbeats); 'vmigrate up' restarts local agents")
            address = rec.address
        ch = connect_agent(self.cfg, address, host)
        self._channels[host] = ch
        return stub_for(ch)

    def host_of(self, vm: str) -> str:
        if self.local_mode:
            self.agent(LOCAL_HOST)
        try:
            return self.store.get_vm(vm).owner
        except store.VmNotFound:
            raise CliError(f"no VM named {vm!r}") from None

    def pick_host(self, memory: int) -> str:
        if self.local_mode:
            return LOCAL_HOST
        best, free = None, -1
        for h in self.store.list_hosts():
            if not h.alive or not h.schedulable:
                continue
            avail = int(h.info.get("memory_available", 0))
            if avail > free:
                best, free = h.name, avail
        if best is None:
            raise CliError("no host can take a guest: none is alive and schedulable")
        if free < memory:
            raise CliError(f"no host has {memory >> 20} MiB available (most: {best} with "
                           f"{free >> 20} MiB)")
        return best

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        if self._store is not None:
            self._store.close()


def rpc(fn: Callable[[], object], what: str = "") -> object:
    try:
        return fn()
    except grpc.RpcError as e:
        raise CliError(_rpc_message(e, what)) from None


def _rpc_message(e: grpc.RpcError, what: str) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else "") or str(code)
    if code == grpc.StatusCode.UNAVAILABLE:
        return (f"{what + ': ' if what else ''}agent unreachable ({details}); "
                "if TLS is on, check the certificates")
    return details


# ---------------------------------------------------------------- commands


def cmd_up(s: Session, a: argparse.Namespace) -> int:
    from vmigrate.cli.cluster import cluster_up

    if a.hosts < 1 or a.hosts > 16:
        raise CliError("--hosts must be 1 to 16")
    cfg = cluster_up(a.hosts, a.store, a.insecure)
    s.cfg = cfg
    st = open_cluster_store(cfg)
    hosts = st.list_hosts()
    st.close()
    if a.json:
        output.print_json({"store": cfg.store_url, "insecure": cfg.insecure,
                           "hosts": [{"name": h.name, "address": h.address, "alive": h.alive}
                                     for h in hosts]})
    else:
        mode = "plaintext (--insecure)" if cfg.insecure else "mutual TLS"
        print(f"cluster up: {len(cfg.hosts)} hosts, store {cfg.store_url}, {mode}")
        output.table(["host", "address", "alive"],
                     [(h.name, h.address, "yes" if h.alive else "no") for h in hosts])
    return 0


def cmd_down(s: Session, a: argparse.Namespace) -> int:
    from vmigrate.cli.cluster import cluster_down, ensure_local_agent  # noqa: F401
    from vmigrate.cli.context import local_dir

    stopped: list[str] = []
    if s.cfg is not None:
        st = None
        with contextlib.suppress(CliError, store.StoreError):
            st = open_cluster_store(s.cfg)
        stopped = cluster_down(s.cfg, st)
        if st is not None:
            st.close()
        s.cfg = None
    from vmigrate.cli.cluster import agent_info, local_address, stop_agent

    if agent_info(local_dir()) is not None:
        stop_agent(local_dir(), local_address(), None, LOCAL_HOST)
        stopped.append(LOCAL_HOST)
    from vmigrate.cli.cluster import kill_leftover_vmms

    kill_leftover_vmms(local_dir().parent)
    if a.json:
        output.print_json({"stopped": stopped})
    else:
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_hosts(s: Session, a: argparse.Namespace) -> int:
    infos = []
    for h in s.hosts():
        info = None
        if h.alive:
            with contextlib.suppress(CliError, grpc.RpcError):
                info = s.agent(h.name).GetHostInfo(agent_pb2.AgentEmpty(), timeout=10)
        infos.append((h, info))
    if a.json:
        output.print_json([{
            "name": h.name, "address": h.address, "alive": h.alive,
            "schedulable": h.schedulable,
            **({} if i is None else output.to_dict(i))} for h, i in infos])
        return 0
    rows = []
    for h, i in infos:
        if i is None:
            rows.append((h.name, h.address, "down", "", "", "", "", ""))
            continue
        rows.append((h.name, h.address, "ready" if h.schedulable else "drained",
                     i.version.software_version,
                     f"{i.version.state_version_min}-{i.version.state_version_max}",
                     i.vm_count, human_bytes(i.memory_available),
                     "yes" if i.runs_guest_user_space else "no (see --json)"))
    output.table(["host", "address", "status", "version", "state", "vms", "mem free",
                  "guest user space"], rows)
    return 0


def _guest_config(a: argparse.Namespace) -> pb.VmConfig:
    memory = parse_size(a.memory or ("256M" if (a.linux or a.kernel) else "64M"), "--memory")
    if memory < (4 << 20) or memory % 4096:
        raise CliError("--memory must be at least 4M and a multiple of 4K")
    if a.vcpus < 1:
        raise CliError("--vcpus must be at least 1")
    config = pb.VmConfig(name=a.name, memory_bytes=memory, vcpu_count=a.vcpus,
                         cpu_template=a.cpu_template)
    if a.test_guest:
        ws = parse_size(a.working_set, "--working-set") if a.working_set else \
            min(memory // 2, max(0, memory - (4 << 20)))
        config.test_guest.CopyFrom(pb.TestGuestConfig(
            working_set_bytes=ws, dirty_rate_bytes_per_s=parse_rate(a.dirty_rate, "--dirty-rate"),
            heartbeat_ms=a.heartbeat_ms, use_rtc=a.rtc, fill_once=a.fill_once))
        from vmigrate.vmm.testguest.layout import TestGuestParams

        try:
            TestGuestParams(memory_bytes=memory, vcpus=a.vcpus, working_set_bytes=ws,
                            dirty_rate_bytes_per_s=0).validate()
        except ValueError as e:
            raise CliError(str(e)) from None
    elif a.linux or a.kernel:
        from vmigrate.vmm import boot

        try:
            config.linux.CopyFrom(boot.linux_config(a.kernel, a.initrd, a.cmdline, a.linux,
                                                    memory_bytes=memory))
        except boot.BootError as e:
            raise CliError(str(e)) from None
    else:
        raise CliError("say which guest to run: --test-guest, --linux, or --kernel FILE")
    return config


def cmd_run(s: Session, a: argparse.Namespace) -> int:
    from vmigrate.migrate.vms import check_vm_name

    try:
        check_vm_name(a.name)
    except ValueError as e:
        raise CliError(str(e)) from None
    config = _guest_config(a)
    host = a.on or s.pick_host(config.memory_bytes)
    if config.WhichOneof("guest") == "linux":
        from vmigrate.cli.linux_commands import check_linux_host

        check_linux_host(s, host, a)
    info = rpc(lambda: s.agent(host).RunVm(agent_pb2.RunVmRequest(config=config,
                                                                  paused=a.paused),
                                           timeout=120))
    if a.json:
        output.print_json(info)
    else:
        print(f"{info.name} {info.state} on {info.host} (pid {info.pid})")
    return 0


def _vm_rows(infos: list[agent_pb2.VmInfo]) -> list[tuple]:
    rows = []
    for i in infos:
        c = i.config
        kind = c.WhichOneof("guest") or "?"
        state = i.state + (f" ({i.operation})" if i.operation else "")
        rows.append((i.name, i.host, state, kind.replace("_", "-"), c.vcpu_count,
                     human_bytes(c.memory_bytes), f"{i.uptime_s:.0f}s", i.pid,
                     i.detail[:60]))
    return rows


def cmd_ps(s: Session, a: argparse.Namespace) -> int:
    infos: list[agent_pb2.VmInfo] = []
    problems = []
    hosts = [h for h in s.hosts()] if (a.all or not s.local_mode) else []
    if s.local_mode:
        infos = list(rpc(lambda: s.agent(LOCAL_HOST).ListVms(agent_pb2.AgentEmpty(),
                                                            timeout=30)).vms)
    else:
        for h in hosts:
            if not h.alive:
                continue
            try:
                infos += list(s.agent(h.name).ListVms(agent_pb2.AgentEmpty(), timeout=30).vms)
            except (grpc.RpcError, CliError) as e:
                problems.append(f"{h.name}: {e}")
    if a.all and not s.local_mode:
        infos += _unseen_guests(s, infos)
    if a.json:
        output.print_json([output.to_dict(i) for i in infos])
    else:
        output.table(["name", "host", "state", "guest", "vcpus", "memory", "uptime", "pid",
                      "detail"], _vm_rows(infos))
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    return 0


def _unseen_guests(s: Session, seen: list[agent_pb2.VmInfo]) -> list[agent_pb2.VmInfo]:
    """`ps --all`: guests the cluster store has whose owner did not list them
    (its agent is down or does not answer), so every guest shows up where it
    belongs, beside any half-arrived copy elsewhere (state "incoming")."""
    listed = {(i.name, i.host) for i in seen}
    alive = {h.name for h in s.store.list_hosts() if h.alive}
    return [agent_pb2.VmInfo(name=v.name, host=v.owner, state="unknown",
                             config=pb.VmConfig(memory_bytes=int(v.spec.get("memory_bytes", 0)),
                                                vcpu_count=int(v.spec.get("vcpus", 0))),
                             detail=("its host does not list it" if v.owner in alive
                                     else "its host's agent is down"))
            for v in s.store.list_vms() if (v.name, v.owner) not in listed]


def cmd_logs(s: Session, a: argparse.Namespace) -> int:
    host = s.host_of(a.name)
    tail = parse_size(a.tail, "--tail") if a.tail else 0
    out = sys.stdout.buffer
    only_new = False
    while True:
        stream = s.agent(host).ReadConsole(agent_pb2.ReadConsoleRequest(
            name=a.name, follow=a.follow, tail_bytes=tail, only_new=only_new))
        try:
            for chunk in stream:
                out.write(chunk.data)
                out.flush()
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                return 0
            if not a.follow or e.code() not in (grpc.StatusCode.NOT_FOUND,
                                                grpc.StatusCode.UNAVAILABLE,
                                                grpc.StatusCode.FAILED_PRECONDITION):
                raise CliError(_rpc_message(e, "logs")) from None
        except KeyboardInterrupt:
            stream.cancel()
            return 0
        if not a.follow:
            return 0
        # The stream ended: the guest moved to another host or into a new VMM
        # (an in-place upgrade), or it stopped. Follow it if it still exists.
        try:
            new_host = s.host_of(a.name)
            s.agent(new_host).GetVm(agent_pb2.VmRef(name=a.name), timeout=10)
        except (CliError, grpc.RpcError):
            time.sleep(0.5)
            try:
                new_host = s.host_of(a.name)
            except CliError:
                print(f"\n[{a.name} stopped]", file=sys.stderr)
                return 0
        if new_host != host:
            print(f"\n[{a.name} moved to {new_host}]", file=sys.stderr)
        host, only_new = new_host, True
        time.sleep(0.2)


def _simple(method: str, verb: str) -> Callable[[Session, argparse.Namespace], int]:
    def run(s: Session, a: argparse.Namespace) -> int:
        host = s.host_of(a.name)
        result = rpc(lambda: getattr(s.agent(host), method)(agent_pb2.VmRef(name=a.name),
                                                            timeout=60))
        if a.json:
            output.print_json(result if isinstance(result, agent_pb2.VmInfo)
                              else {"name": a.name, "result": verb})
        else:
            print(f"{a.name} {verb}")
        return 0
    return run


def cmd_checkpoint(s: Session, a: argparse.Namespace) -> int:
    host = s.host_of(a.name)
    path = Path(a.file).absolute()
    req = agent_pb2.CheckpointRequest(
        name=a.name, path=str(path), stop=a.stop,
        incremental_from=str(Path(a.incremental_from).absolute()) if a.incremental_from else "",
        target_state_version=a.target_version or 0, compress=a.compress,
        lazy_layout=a.mapped)
    stream = s.agent(host).Checkpoint(req)
    last = rpc(lambda: output.follow_progress(stream, f"checkpoint {a.name}", a.json))
    r = last.checkpoint
    if a.json:
        output.print_json(r)
    else:
        pages = r.pages_raw + r.pages_compressed + r.pages_zero
        print(f"{a.name} checkpointed to {r.path}: {human_bytes(r.file_bytes)}, {pages} pages "
              f"({r.pages_compressed} compressed, {r.pages_raw} raw, {r.pages_zero} zero"
              + (f", {r.pages_unchanged} unchanged" if r.pages_unchanged else "")
              + f"), guest paused {r.pause_ms:.1f} ms, total {r.total_ms:.0f} ms"
              + (", guest stopped" if a.stop else ""))
    return 0


def cmd_restore(s: Session, a: argparse.Namespace) -> int:
    path = Path(a.file).absolute()
    if not path.exists():
        raise CliError(f"{path}: no such file")
    host = a.on or (LOCAL_HOST if s.local_mode else s.pick_host(0))
    req = agent_pb2.RestoreRequest(path=str(path), name=a.name or "", lazy=a.lazy,
                                   paused=a.paused)
    stream = s.agent(host).Restore(req)
    last = rpc(lambda: output.follow_progress(stream, "restore", a.json))
    r = last.checkpoint
    if a.json:
        output.print_json(r)
    else:
        print(f"{r.vm} restored on {host} from {r.path} in {r.restore_ms:.0f} ms"
              + (" (paused)" if a.paused else ""))
    return 0


def cmd_inspect(s: Session, a: argparse.Namespace) -> int:
    from vmigrate.migrate import inspect

    try:
        inspect.main(Path(a.file), as_json=a.json, show_chunks=a.chunks)
    except inspect.InspectError as e:
        raise CliError(str(e)) from None
    return 0


def cmd_send(s: Session, a: argparse.Namespace) -> int:
    host = s.host_of(a.name)
    req = agent_pb2.SendRequest(
        name=a.name, destination=a.host, downtime_ms=a.downtime_ms, streams=a.streams,
        compress=a.compress, timeout_s=a.timeout,
        bandwidth_bytes_per_s=parse_rate(a.bandwidth, "--bandwidth") if a.bandwidth else 0)
    if a.host == host:
        raise CliError(f"{a.name} already runs on {host}")
    if not s.local_mode:
        try:
            s.store.get_host(a.host)
        except store.HostNotFound:
            known = ", ".join(h.name for h in s.store.list_hosts())
            raise CliError(f"unknown host {a.host!r} (known hosts: {known})") from None
    else:
        raise CliError(f"unknown host {a.host!r}: no cluster is set up here "
                       "(start one with 'vmigrate up')")
    stream = s.agent(host).Send(req)
    try:
        last = rpc(lambda: output.follow_progress(stream, f"send {a.name} to {a.host}", a.json))
    except KeyboardInterrupt:
        stream.cancel()
        raise CliError("interrupted: the migration was cancelled; the guest keeps running "
                       f"on {host}") from None
    r = last.migration
    if a.json:
        output.print_json(r)
    else:
        print(f"{a.name} now runs on {a.host}: {r.total_ms:.0f} ms total, downtime "
              f"{r.downtime_ms:.1f} ms, {human_bytes(r.bytes_on_wire)} on the wire in "
              f"{len(r.rounds)} rounds, {r.compression}")
    return 0


def cmd_version(s: Session, a: argparse.Namespace) -> int:
    from vmigrate.migrate import versions

    info = versions.version_info()
    if a.json:
        output.print_json(info)
    else:
        print(f"vmigrate {info.software_version} (state versions "
              f"{info.state_version_min}-{info.state_version_max})")
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vmigrate", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, fn: Callable, help_: str, epilog: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=fn)
        return p

    p = cmd("up", cmd_up, "start a local cluster of agents on this machine",
            "Agents host1..hostN run here, each with its own state directory, sharing a\n"
            "cluster store (SQLite by default). Agents and CLI use mutual TLS under a\n"
            "cluster CA created on first use. Running it again starts missing agents.")
    p.add_argument("--hosts", type=int, default=2, help="number of agents (default 2)")
    p.add_argument("--store", help="cluster store URL (default: SQLite under VMIGRATE_HOME; "
                                   "or etcd://HOST:PORT)")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext without authentication (local experiments only)")
    cmd("down", cmd_down, "stop the local cluster (or the on-demand agent) and its guests")
    cmd("hosts", cmd_hosts, "list the cluster's hosts")

    p = cmd("run", cmd_run, "boot a new guest",
            "examples:\n  vmigrate run vm1 --test-guest\n"
            "  vmigrate run vm1 --test-guest --memory 1G --working-set 256M "
            "--dirty-rate 50M\n  vmigrate run vm2 --linux --memory 512M")
    p.add_argument("name")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--test-guest", action="store_true",
                      help="the built-in self-checking test guest")
    kind.add_argument("--linux", action="store_true", help="the default Linux image "
                                                           "('vmigrate image build')")
    kind.add_argument("--kernel", help="a Linux kernel (bzImage or vmlinux) to boot")
    p.add_argument("--initrd", help="initramfs for --kernel")
    p.add_argument("--cmdline", help="kernel command line for --kernel/--linux")
    p.add_argument("--memory", help="guest memory (default 64M; 256M for Linux)")
    p.add_argument("--vcpus", type=int, default=1, help="vCPUs (default 1)")
    p.add_argument("--working-set", help="test guest: memory it rewrites (default half)")
    p.add_argument("--dirty-rate", default="4M",
                   help="test guest: bytes rewritten per second (default 4M)")
    p.add_argument("--heartbeat-ms", type=int, default=1000, help="test guest heartbeat period")
    p.add_argument("--fill-once", action="store_true",
                   help="test guest: write the working set once at --dirty-rate, then only "
                        "verify it (a guest with data that has gone quiet)")
    p.add_argument("--rtc", action="store_true",
                   help="test guest: read the CMOS clock in every heartbeat (a guest that "
                        "uses the RTC cannot move to vmigrate 0.1.0)")
    p.add_argument("--cpu-template", default="host", help="CPU model: host or baseline")
    p.add_argument("--on", metavar="HOST", help="host to run on (default: most free memory)")
    p.add_argument("--paused", action="store_true", help="create it but do not start it")
    from vmigrate.cli.linux_commands import add_run_options

    add_run_options(p)

    p = cmd("ps", cmd_ps, "list guests")
    p.add_argument("--all", action="store_true",
                   help="every guest of the cluster, with its host, including guests "
                        "whose host does not answer (from the cluster store)")

    p = cmd("logs", cmd_logs, "show a guest's serial console")
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    p.add_argument("--tail", help="only the last SIZE bytes (e.g. 4K)")

    for name, method, verb, help_ in (("pause", "PauseVm", "paused", "pause a guest"),
                                      ("resume", "ResumeVm", "resumed", "resume a guest"),
                                      ("stop", "StopVm", "stopped", "stop a guest for good"),
                                      ("cancel", "Cancel", "cancel requested",
                                       "cancel a running send or checkpoint")):
        p = cmd(name, _simple(method, verb), help_)
        p.add_argument("name")

    p = cmd("checkpoint", cmd_checkpoint, "save a running guest to a file",
            "Live by default: memory is copied while the guest runs, then the guest\n"
            "pauses briefly for the last pages and its device state. With\n"
            "--incremental-from only pages changed since OLDER are written.")
    p.add_argument("name")
    p.add_argument("file")
    p.add_argument("--stop", action="store_true", help="leave the guest stopped afterwards")
    p.add_argument("--incremental-from", metavar="OLDER", help="an older checkpoint of it")
    p.add_argument("--target-version", type=int, metavar="V",
                   help="write state version V (for an older vmigrate)")
    p.add_argument("--compress", default="auto", help="auto, off or a zstd level")
    p.add_argument("--mapped", action="store_true",
                   help="store memory uncompressed at its place in the file (bigger), so "
                        "'restore --lazy' can start the guest before its memory is read")

    p = cmd("restore", cmd_restore, "start a guest from a checkpoint file",
            "With --lazy (a file written with 'checkpoint --mapped') the guest starts as\n"
            "soon as its state is loaded and its memory follows on demand.")
    p.add_argument("file")
    p.add_argument("--name", help="name of the restored guest (default: as saved)")
    p.add_argument("--on", metavar="HOST", help="host to restore on")
    p.add_argument("--lazy", action="store_true",
                   help="run at once; memory follows from the file on demand")
    p.add_argument("--paused", action="store_true", help="restore but do not run")

    p = cmd("inspect", cmd_inspect, "print a checkpoint file (any version) as text or JSON")
    p.add_argument("file")
    p.add_argument("--chunks", action="store_true", help="list every memory chunk")

    p = cmd("send", cmd_send, "live-migrate a guest to another host",
            "example:\n  vmigrate send host2 vm1 --downtime-ms 20 --streams 2")
    p.add_argument("host", help="destination host")
    p.add_argument("name", help="the guest")
    p.add_argument("--downtime-ms", type=int, default=20, help="acceptable downtime "
                                                                "(default 20)")
    p.add_argument("--streams", type=int, default=2, help="parallel memory streams")
    p.add_argument("--compress", default="auto", help="auto, off or a zstd level")
    p.add_argument("--bandwidth", help="cap the transfer rate (e.g. 100M, 1Gbit/s)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="give up after S seconds if it does not converge")

    cmd("version", cmd_version, "show the version and the state versions it speaks")
    _add_later_commands(cmd)
    return ap


def _add_later_commands(cmd: Callable) -> None:
    """Commands of the other modules (cluster operations, images, security)."""
    from vmigrate.cli import commands_extra, linux_commands, security_commands

    commands_extra.register(cmd)
    linux_commands.register(cmd)
    security_commands.register(cmd)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if not getattr(a, "func", None):
        ap.print_help()
        return 2
    s = Session()
    try:
        return a.func(s, a)
    except CliError as e:
        print(f"vmigrate: {e}", file=sys.stderr)
        return 1
    except store.StoreError as e:
        print(f"vmigrate: cluster store: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"vmigrate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vmigrate: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"vmigrate: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    finally:
        s.close()


if __name__ == "__main__":
    sys.exit(main())
