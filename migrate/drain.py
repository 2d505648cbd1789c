"""Operations over the whole cluster: drain a host, re-admit it, roll an
upgrade across hosts (docs/operations.md).

Where this runs: in the CLI process. It only needs what the CLI already has
-- the cluster store and a channel to every agent -- and composes calls that
exist (GetHostInfo, ListVms, GetVm, Send). Every guest move is one complete
live migration with its own compare-and-swap, so the orchestrator holds no
state a guest's safety depends on: if the CLI dies or is interrupted, the
moves in flight roll back (a cancelled Send resumes the guest at its source),
finished moves stand, the host stays drained, and running the command again
picks up where it stopped. No agent-to-agent coordination and no new RPC are
needed, and an agent of an older release can be drained the same way.

drain(HOST):
  1. HOST is marked unschedulable first: no new guest and no migration can
     land there (RunVm, Restore, Negotiate and begin_migration refuse).
  2. Its guests (the store's owner field) move, at most `parallel` at a time,
     each to the alive, schedulable host with the most free memory (or one
     of `to`), largest guests first. A failed move is retried on another
     host; a guest that cannot move stays where it is and is reported.
  3. Guests that arrived meanwhile (a migration begun before step 1) are
     picked up by another pass; at the end HOST's agent is asked what it
     still runs.

rolling_upgrade(HOSTS, CMD): for each host in turn: drain; run CMD (it
upgrades and restarts that host's agent); wait for a *new* registration in
the store (the lease changes) whose agent answers GetHostInfo; re-admit it.
It stops at the first failure, with every guest running somewhere, and says
where things stand.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import grpc

from vmigrate.migrate import store
from vmigrate.proto import agent_pb2, agent_pb2_grpc

GET_INFO_TIMEOUT_S = 10.0
BUSY_RETRY_S = 2.0
MAX_PASSES = 5
ARRIVAL_WAIT_S = 600.0          # as long as a migration's page stream may take

Connect = Callable[[str, str], grpc.Channel]        # (host name, address) -> channel


class OperationError(Exception):
    """A cluster operation cannot go on; one line for the user."""


class Agents:
    """Channels to agents by host name, dialled again when a host comes back
    at another address (an agent restarted on a new port)."""

    def __init__(self, st: store.ClusterStore, connect: Connect) -> None:
        self.store = st
        self.connect = connect
        self._channels: dict[str, tuple[str, grpc.Channel]] = {}
        self._lock = threading.Lock()

    def stub(self, host: str) -> agent_pb2_grpc.AgentStub:
        address = self.store.get_host(host).address
        with self._lock:
            known = self._channels.get(host)
            if known is None or known[0] != address:
                if known is not None:
                    known[1].close()
                self._channels[host] = (address, self.connect(host, address))
            return agent_pb2_grpc.AgentStub(self._channels[host][1])

    def forget(self, host: str) -> None:
        with self._lock:
            known = self._channels.pop(host, None)
        if known is not None:
            known[1].close()

    def host_info(self, host: str, timeout: float = GET_INFO_TIMEOUT_S) -> agent_pb2.HostInfo:
        return self.stub(host).GetHostInfo(agent_pb2.AgentEmpty(), timeout=timeout)

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for _, ch in channels:
            ch.close()


def rpc_text(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else "") or str(code)
    if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details.lower():
        return "agent unreachable"
    return " ".join(details.split())


# ---------------------------------------------------------------- results


@dataclass
class GuestOutcome:
    vm: str
    source: str
    memory_bytes: int = 0
    destination: str = ""
    moved: bool = False
    error: str = ""
    seconds: float = 0.0
    downtime_ms: float = 0.0
    tried: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DrainReport:
    host: str
    moved: list[GuestOutcome] = field(default_factory=list)
    stayed: list[GuestOutcome] = field(default_factory=list)
    seconds: float = 0.0
    passes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.stayed

    def to_dict(self) -> dict:
        return {"host": self.host, "schedulable": False, "ok": self.ok,
                "moved": [g.to_dict() for g in self.moved],
                "stayed": [g.to_dict() for g in self.stayed],
                "seconds": round(self.seconds, 3), "passes": self.passes, "notes": self.notes}


class Reporter(Protocol):
    """How an operation shows what it does (the CLI: lines, a live display, or nothing)."""

    def note(self, text: str) -> None: ...
    def guest_started(self, vm: str, source: str, destination: str) -> None: ...
    def guest_progress(self, vm: str, p: agent_pb2.Progress) -> None: ...
    def guest_done(self, outcome: GuestOutcome) -> None: ...


class QuietReporter:
    def note(self, text: str) -> None:
        pass

    def guest_started(self, vm: str, source: str, destination: str) -> None:
        pass

    def guest_progress(self, vm: str, p: agent_pb2.Progress) -> None:
        pass

    def guest_done(self, outcome: GuestOutcome) -> None:
        pass


@dataclass
class DrainOptions:
    parallel: int = 2
    to: list[str] = field(default_factory=list)
    downtime_ms: int = 0              # 0: the agent's default
    timeout_s: float = 0.0            # per guest: give up if it does not converge
    attempts: int = 3                 # destinations tried per guest


# ---------------------------------------------------------------- placement


class Placement:
    """Free memory per destination, booked as guests are assigned, so parallel
    moves spread instead of all picking the same emptiest host."""

    def __init__(self, free: dict[str, int]) -> None:
        self.free = dict(free)
        self._lock = threading.Lock()

    def take(self, need: int, exclude: set[str]) -> str | None:
        with self._lock:
            fits = [h for h, f in self.free.items() if h not in exclude and f >= need]
            if not fits:
                return None
            best = max(fits, key=lambda h: (self.free[h], h))
            self.free[best] -= need
            return best

    def give_back(self, host: str, need: int) -> None:
        with self._lock:
            if host in self.free:
                self.free[host] += need

    def describe(self, need: int, exclude: set[str]) -> str:
        with self._lock:
            left = {h: f for h, f in self.free.items() if h not in exclude}
        if not left:
            return "no other alive, schedulable host is left to try"
        best = max(left, key=lambda h: left[h])
        return (f"no host has {need >> 20} MiB free (most: {best} with "
                f"{left[best] >> 20} MiB)")


def destinations(st: store.ClusterStore, agents: Agents, host: str,
                 to: list[str]) -> dict[str, int]:
    """Free memory of every host a guest of `host` may go to."""
    hosts = {h.name: h for h in st.list_hosts()}
    if to:
        for name in to:
            h = hosts.get(name)
            if h is None:
                raise OperationError(f"unknown host {name!r} in --to (known hosts: "
                                     f"{', '.join(hosts) or 'none'})")
            if name == host:
                raise OperationError(f"--to {name}: that is the host being drained")
            if not h.alive:
                raise OperationError(f"--to {name}: its agent is down (no heartbeat)")
            if not h.schedulable:
                raise OperationError(f"--to {name}: it is drained itself "
                                     f"('vmigrate undrain {name}' first)")
        names = list(dict.fromkeys(to))
    else:
        names = [n for n, h in hosts.items() if n != host and h.alive and h.schedulable]
    free = {}
    for name in names:
        try:
            free[name] = int(agents.host_info(name).memory_available)
        except (grpc.RpcError, store.StoreError):
            free[name] = int(hosts[name].info.get("memory_available", 0))
    return free


# ---------------------------------------------------------------- drain


class Drain:
    def __init__(self, st: store.ClusterStore, agents: Agents, host: str, opts: DrainOptions,
                 reporter: Reporter | None = None) -> None:
        if opts.parallel < 1:
            raise OperationError("--parallel must be at least 1")
        self.store = st
        self.agents = agents
        self.host = host
        self.opts = opts
        self.reporter: Reporter = reporter or QuietReporter()
        self.report = DrainReport(host=host)
        self._cancel = threading.Event()
        self._streams: set[object] = set()
        self._lock = threading.Lock()
        self._source_down = ""

    def cancel(self) -> None:
        """Stop: the moves in flight are cancelled (their guests stay at the source)."""
        self._cancel.set()
        with self._lock:
            streams = list(self._streams)
        for s in streams:
            with contextlib.suppress(Exception):
                s.cancel()  # type: ignore[attr-defined]

    def run(self) -> DrainReport:
        t0 = time.monotonic()
        try:
            rec = self.store.get_host(self.host)
        except store.HostNotFound:
            known = ", ".join(h.name for h in self.store.list_hosts()) or "none"
            raise OperationError(f"unknown host {self.host!r} (known hosts: {known})") from None
        # --to is checked (and free memory read) before anything changes.
        placement = Placement(destinations(self.store, self.agents, self.host, self.opts.to))
        # Then, first of all: nothing new lands on the host from now on.
        if rec.schedulable:
            self.store.set_schedulable(self.host, False)
        self.reporter.note(f"{self.host} is unschedulable: no new guest lands there")
        owned = self.store.list_vms(owner=self.host)
        if not owned:
            self.reporter.note(f"{self.host} has no guests")
        elif not rec.alive:
            raise OperationError(f"{self.host}'s agent is down (no heartbeat): its "
                                 f"{len(owned)} guests cannot be moved until it is back")
        done: set[str] = set()
        while not self._cancel.is_set() and self.report.passes < MAX_PASSES:
            todo = [v for v in self.store.list_vms(owner=self.host) if v.name not in done]
            if not todo and not self._wait_arrivals():
                break
            if not todo:
                continue
            self.report.passes += 1
            todo.sort(key=lambda v: (-int(v.spec.get("memory_bytes", 0)), v.name))
            if self.report.passes == 1:
                self.reporter.note(f"moving {len(todo)} guests off {self.host}, up to "
                                   f"{self.opts.parallel} at a time")
            else:
                self.reporter.note(f"{len(todo)} more guests arrived on {self.host} meanwhile")
            for outcome in self._pass(todo, placement):
                done.add(outcome.vm)
                (self.report.moved if outcome.moved else self.report.stayed).append(outcome)
        self._still_here(done)
        self.report.seconds = time.monotonic() - t0
        return self.report

    def _wait_arrivals(self) -> bool:
        """Migrations into the host begun before it was drained may still
        commit: wait until none is pending; True if one committed (and its
        guest now needs a pass)."""
        deadline = time.monotonic() + ARRIVAL_WAIT_S
        waited = False
        while not self._cancel.is_set():
            incoming = [m for m in self.store.list_migrations()
                        if m.dst == self.host and m.state == store.MigrationState.PENDING]
            if not incoming:
                return waited
            if time.monotonic() > deadline:
                self.report.notes.append(
                    f"migrations into {self.host} still pending after {ARRIVAL_WAIT_S:.0f} s: "
                    + ", ".join(m.vm for m in incoming))
                return False
            if not waited:
                self.reporter.note(f"waiting for {len(incoming)} migrations into {self.host} "
                                   "begun before it was drained")
            waited = True
            time.sleep(0.5)
        return False

    def _pass(self, todo: list[store.VmRecord],
              placement: Placement) -> Iterator[GuestOutcome]:
        pending = list(todo)
        running: list[tuple[threading.Thread, list[GuestOutcome]]] = []
        while pending or running:
            while pending and len(running) < self.opts.parallel:
                vm = pending.pop(0)
                box: list[GuestOutcome] = []
                t = threading.Thread(target=lambda v=vm, b=box: b.append(self._guest(v, placement)),
                                     name=f"drain-{vm.name}", daemon=True)
                t.start()
                running.append((t, box))
            for t, box in list(running):
                t.join(0.05)
                if not t.is_alive():
                    running.remove((t, box))
                    outcome = box[0] if box else GuestOutcome(vm="?", source=self.host,
                                                              error="internal error")
                    self.reporter.guest_done(outcome)
                    yield outcome

    def _guest(self, vm: store.VmRecord, placement: Placement) -> GuestOutcome:
        need = int(vm.spec.get("memory_bytes", 0))
        out = GuestOutcome(vm=vm.name, source=self.host, memory_bytes=need)
        t0 = time.monotonic()
        excluded: set[str] = set()
        try:
            for _ in range(max(1, self.opts.attempts)):
                if self._cancel.is_set():
                    out.error = out.error or "interrupted before it moved"
                    break
                if self._source_down:
                    out.error = self._source_down
                    break
                dest = placement.take(need, excluded)
                if dest is None:
                    out.error = (f"{out.error}; " if out.error else "") + \
                        placement.describe(need, excluded)
                    break
                out.tried.append(dest)
                self._clear_stale_migration(vm.name, out)
                err, code = self._send(vm.name, dest, out)
                if err is None:
                    out.moved, out.destination = True, dest
                    break
                placement.give_back(dest, need)
                # Whatever the error says, the store says where the guest is.
                owner = self._owner(vm.name)
                if owner is not None and owner != self.host:
                    out.moved, out.destination = True, owner
                    out.notes.append(f"the move reported '{err}', but the store says {owner} "
                                     "owns it")
                    break
                out.error = err
                if code == grpc.StatusCode.CANCELLED and self._cancel.is_set():
                    break
                if not self._source_answers():
                    self._source_down = (f"{self.host}'s agent stopped answering ({err}); "
                                         "the guest stays there")
                    out.error = self._source_down
                    break
                if code == grpc.StatusCode.ABORTED:     # busy: another operation on it
                    time.sleep(BUSY_RETRY_S)
                    continue
                excluded.add(dest)
        finally:
            out.seconds = time.monotonic() - t0
        return out

    def _send(self, name: str, dest: str,
              out: GuestOutcome) -> tuple[str | None, grpc.StatusCode | None]:
        """One migration, its progress relayed; (None, None) or (error, code)."""
        self.reporter.guest_started(name, self.host, dest)
        req = agent_pb2.SendRequest(name=name, destination=dest,
                                    downtime_ms=self.opts.downtime_ms,
                                    timeout_s=self.opts.timeout_s)
        try:
            stream = self.agents.stub(self.host).Send(req)
        except (grpc.RpcError, store.StoreError) as e:
            return str(e), None
        with self._lock:
            self._streams.add(stream)
        try:
            if self._cancel.is_set():
                stream.cancel()
            last = agent_pb2.Progress()
            for p in stream:
                last = p
                self.reporter.guest_progress(name, p)
            if last.HasField("migration"):
                out.downtime_ms = last.migration.downtime_ms
            return None, None
        except grpc.RpcError as e:
            return rpc_text(e), e.code() if hasattr(e, "code") else None
        finally:
            with self._lock:
                self._streams.discard(stream)

    def _owner(self, name: str) -> str | None:
        try:
            return self.store.get_vm(name).owner
        except store.NotFound:
            return ""
        except store.StoreError:
            return None

    def _source_answers(self) -> bool:
        try:
            self.agents.host_info(self.host, timeout=5)
            return True
        except (grpc.RpcError, store.StoreError):
            return False

    def _clear_stale_migration(self, name: str, out: GuestOutcome) -> None:
        """A migration still pending from this host while the agent runs no
        send of the guest was begun by an agent that died (a killed agent's
        successor does not abort it): abort it, or it blocks every new move
        until the destination gives up on it (minutes). Exactly one of this
        abort and the destination's commit can win, as always."""
        try:
            mig = self.store.get_migration(name)
            if mig is None or mig.state != store.MigrationState.PENDING or mig.src != self.host:
                return
            info = self.agents.stub(self.host).GetVm(agent_pb2.VmRef(name=name), timeout=5)
            if info.operation:
                return                 # a live send: it settles itself
            if self.store.abort_migration(name, mig.migration_id):
                with contextlib.suppress(store.StoreError):
                    self.store.finish_migration(name, mig.migration_id)
                out.notes.append(f"aborted migration {mig.migration_id} to {mig.dst}, left "
                                 "pending by an agent that is gone")
        except (grpc.RpcError, store.StoreError):
            return

    def _still_here(self, done: set[str]) -> None:
        """What the host's agent still runs that is not accounted for."""
        if self._cancel.is_set():
            return
        try:
            vms = self.agents.stub(self.host).ListVms(agent_pb2.AgentEmpty(),
                                                      timeout=GET_INFO_TIMEOUT_S).vms
        except (grpc.RpcError, store.StoreError) as e:
            if self.report.moved or self.report.stayed:
                self.report.notes.append(f"could not ask {self.host} what it still runs: "
                                         f"{rpc_text(e) if isinstance(e, grpc.RpcError) else e}")
            return
        stayed = {g.vm for g in self.report.stayed}
        for v in vms:
            if v.name in stayed or v.state == "incoming":
                continue
            owner = self._owner(v.name)
            if owner == self.host:
                out = GuestOutcome(vm=v.name, source=self.host,
                                   memory_bytes=v.config.memory_bytes,
                                   error="still runs here (it arrived after the last pass)")
                self.report.stayed.append(out)
                self.reporter.guest_done(out)
            elif v.name not in done:
                self.report.notes.append(f"{self.host} runs a VMM for {v.name}, which the store "
                                         f"gives to {owner or 'nobody'}")


def drain(st: store.ClusterStore, agents: Agents, host: str, opts: DrainOptions,
          reporter: Reporter | None = None) -> DrainReport:
    return Drain(st, agents, host, opts, reporter).run()


def undrain(st: store.ClusterStore, host: str) -> store.HostRecord:
    try:
        return st.set_schedulable(host, True)
    except store.HostNotFound:
        known = ", ".join(h.name for h in st.list_hosts()) or "none"
        raise OperationError(f"unknown host {host!r} (known hosts: {known})") from None


# ---------------------------------------------------------------- rolling upgrade


@dataclass
class HostStep:
    host: str
    address: str = ""
    version_before: str = ""
    version_after: str = ""
    lease_before: str = ""
    lease_after: str = ""
    guests_moved: int = 0
    drain_s: float = 0.0
    command_s: float = 0.0
    back_s: float = 0.0
    readmitted: bool = False
    ok: bool = False
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class RollingUpgradeStopped(OperationError):
    def __init__(self, message: str, steps: list[HostStep], placement: dict[str, str]) -> None:
        super().__init__(message)
        self.steps = steps
        self.placement = placement


@dataclass
class RollingOptions:
    command: str
    hosts: list[str]
    home: str
    timeout_s: float = 300.0          # per host: CMD plus the agent coming back
    drain: DrainOptions = field(default_factory=DrainOptions)


class RollingUpgrade:
    def __init__(self, st: store.ClusterStore, agents: Agents, opts: RollingOptions,
                 reporter: Reporter | None = None,
                 command_output: int | None = None) -> None:
        self.store = st
        self.agents = agents
        self.opts = opts
        self.reporter: Reporter = reporter or QuietReporter()
        self.command_output = command_output
        self.steps: list[HostStep] = []
        self.current: Drain | None = None

    def cancel(self) -> None:
        if self.current is not None:
            self.current.cancel()

    def run(self) -> list[HostStep]:
        known = {h.name: h for h in self.store.list_hosts()}
        hosts = self.opts.hosts or sorted(known)
        for h in hosts:
            if h not in known:
                raise OperationError(f"unknown host {h!r} (known hosts: "
                                     f"{', '.join(known) or 'none'})")
            if not known[h].alive:
                raise OperationError(f"host {h} is down (no heartbeat): bring its agent back "
                                     "or leave it out with --hosts")
        if len(hosts) != len(set(hosts)):
            raise OperationError("--hosts names a host twice")
        for h in hosts:
            step = HostStep(host=h)
            self.steps.append(step)
            try:
                self._one(step)
            except OperationError as e:
                step.error = str(e)
            except store.StoreError as e:
                step.error = f"cluster store: {e}"
            except grpc.RpcError as e:
                step.error = rpc_text(e)
            finally:
                self.current = None
            if step.error:
                raise self._stopped(step, hosts)
            step.ok = True
        return self.steps

    def _one(self, step: HostStep) -> None:
        h = step.host
        rec = self.store.get_host(h)
        was_schedulable = rec.schedulable
        step.address, step.lease_before = rec.address, rec.lease
        try:
            step.version_before = self.agents.host_info(h).version.software_version
        except grpc.RpcError as e:
            raise OperationError(f"{h}'s agent does not answer: {rpc_text(e)}") from None
        self.reporter.note(f"{h}: draining (vmigrate {step.version_before})")
        t = time.monotonic()
        self.current = Drain(self.store, self.agents, h, self.opts.drain, self.reporter)
        report = self.current.run()
        self.current = None
        step.drain_s = time.monotonic() - t
        step.guests_moved = len(report.moved)
        if report.stayed:
            names = ", ".join(f"{g.vm} ({g.error})" for g in report.stayed)
            raise OperationError(f"{len(report.stayed)} guests could not leave {h}: {names}")
        self.reporter.note(f"{h}: drained ({len(report.moved)} guests moved in "
                           f"{step.drain_s:.1f} s); running the upgrade command")
        deadline = time.monotonic() + self.opts.timeout_s
        t = time.monotonic()
        self._command(step, deadline)
        step.command_s = time.monotonic() - t
        t = time.monotonic()
        self._wait_back(step, deadline)
        step.back_s = time.monotonic() - t
        # A drained host that restarts empty registers anew (schedulable), one
        # that kept guests keeps its flag: set it either way, as it was before.
        self.store.set_schedulable(h, was_schedulable)
        step.readmitted = was_schedulable
        self.reporter.note(f"{h}: back with vmigrate {step.version_after} (was "
                           f"{step.version_before}) after {step.back_s:.1f} s; "
                           + ("re-admitted" if was_schedulable else
                              "left drained, as it was before"))

    def _command(self, step: HostStep, deadline: float) -> None:
        env = {**os.environ, "VMIGRATE_HOST": step.host, "VMIGRATE_HOME": self.opts.home,
               "VMIGRATE_HOST_ADDRESS": step.address, "VMIGRATE_STORE": self.store.url}
        try:
            p = subprocess.run(self.opts.command, shell=True, env=env, stdin=subprocess.DEVNULL,
                               stdout=self.command_output, stderr=self.command_output,
                               timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise OperationError(f"the upgrade command did not finish on {step.host} within "
                                 f"{self.opts.timeout_s:.0f} s") from None
        except OSError as e:
            raise OperationError(f"cannot run the upgrade command: {e.strerror or e}") from None
        if p.returncode != 0:
            raise OperationError(f"the upgrade command failed on {step.host} "
                                 f"(exit status {p.returncode})")

    def _wait_back(self, step: HostStep, deadline: float) -> None:
        """Until a new registration of the host (its lease changed) answers."""
        h = step.host
        why = "it has not registered again"
        while time.monotonic() < deadline:
            try:
                rec = self.store.get_host(h)
                if not rec.alive:
                    why = "it is registered but not alive"
                elif rec.lease == step.lease_before:
                    why = ("its lease is unchanged: the agent was not restarted "
                           "(the command must restart it)")
                else:
                    self.agents.forget(h)
                    info = self.agents.host_info(h, timeout=5)
                    step.lease_after = rec.lease
                    step.version_after = info.version.software_version
                    return
            except store.HostNotFound:
                why = "it has not registered again"
            except store.StoreError as e:
                why = f"cluster store: {e}"
            except grpc.RpcError as e:
                why = f"it registered but does not answer ({rpc_text(e)})"
            time.sleep(0.2)
        raise OperationError(f"the agent of {h} did not come back within "
                             f"{self.opts.timeout_s:.0f} s: {why}")

    def _stopped(self, step: HostStep, hosts: list[str]) -> RollingUpgradeStopped:
        done = [s.host for s in self.steps if s.ok]
        left = [h for h in hosts if h not in done and h != step.host]
        placement = where_guests_run(self.store, self.agents)
        where: dict[str, list[str]] = {}
        for vm, host in sorted(placement.items()):
            where.setdefault(host, []).append(vm)
        guests = "; ".join(f"{h}: {', '.join(vms)}" for h, vms in sorted(where.items())) \
            or "no guests"
        drained = ""
        with contextlib.suppress(store.StoreError):
            if not self.store.get_host(step.host).schedulable:
                drained = (f" {step.host} stays drained ('vmigrate undrain {step.host}' "
                           "re-admits it).")
        msg = (f"rolling upgrade stopped at {step.host}: {step.error}.{drained} "
               f"Upgraded: {', '.join(done) or 'none'}; not started: {', '.join(left) or 'none'}."
               f" Guests: {guests}")
        return RollingUpgradeStopped(msg, self.steps, placement)


def where_guests_run(st: store.ClusterStore, agents: Agents) -> dict[str, str]:
    """Guest -> where it runs, from the store and checked with the agents:
    'host1', or 'host1 (not answering)' / 'host1 (not running there!)'."""
    out: dict[str, str] = {}
    try:
        vms = st.list_vms()
        hosts = {h.name: h for h in st.list_hosts()}
    except store.StoreError as e:
        return {"?": f"cluster store unavailable: {e}"}
    running: dict[str, set[str]] = {}
    for name, h in hosts.items():
        if not h.alive:
            continue
        with contextlib.suppress(grpc.RpcError, store.StoreError):
            running[name] = {v.name for v in agents.stub(name).ListVms(
                agent_pb2.AgentEmpty(), timeout=GET_INFO_TIMEOUT_S).vms
                if v.state in ("running", "paused")}
    for v in vms:
        if v.owner not in running:
            out[v.name] = f"{v.owner} (not answering)"
        elif v.name in running[v.owner]:
            out[v.name] = v.owner
        else:
            out[v.name] = f"{v.owner} (not running there!)"
    return out
