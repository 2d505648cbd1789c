"""Commands beyond the core set, registered into the `vmigrate` parser:
cluster operations (drain, undrain, rolling-upgrade) and the same-host live
update of one guest (upgrade). The orchestration itself is migrate/drain.py;
this module parses options and shows progress."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from vmigrate.cli import output
from vmigrate.cli.context import CliError, connect_agent, home
from vmigrate.cli.sizes import human_bytes
from vmigrate.migrate import drain as ops
from vmigrate.proto import agent_pb2

if TYPE_CHECKING:
    from vmigrate.cli.main import Session


# ---------------------------------------------------------------- progress display


class LineReporter:
    """One line per guest when its move ends (logs, pipes, CI), plus notes."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._lock = threading.Lock()

    def _print(self, text: str) -> None:
        if not self.quiet:
            with self._lock:
                print(text, flush=True)

    def note(self, text: str) -> None:
        self._print(text)

    def guest_started(self, vm: str, source: str, destination: str) -> None:
        pass

    def guest_progress(self, vm: str, p: agent_pb2.Progress) -> None:
        pass

    def guest_done(self, outcome: ops.GuestOutcome) -> None:
        self._print(guest_line(outcome))

    def close(self) -> None:
        pass


class LiveReporter(LineReporter):
    """On a terminal: a live bar per guest in flight (stderr); the same
    per-guest lines as LineReporter once each move ends."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]{task.fields[title]}"), BarColumn(),
                            TextColumn("{task.description}"), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True)
        self.tasks: dict[str, object] = {}
        self.bar.start()

    def _print(self, text: str) -> None:
        with self._lock:
            self.bar.console.print(text, highlight=False, markup=False)

    def guest_started(self, vm: str, source: str, destination: str) -> None:
        with self._lock:
            if vm in self.tasks:
                self.bar.remove_task(self.tasks.pop(vm))  # type: ignore[arg-type]
            self.tasks[vm] = self.bar.add_task("starting", total=None,
                                               title=f"{vm} {source} -> {destination}")

    def guest_progress(self, vm: str, p: agent_pb2.Progress) -> None:
        from vmigrate.cli.output import _describe

        with self._lock:
            task = self.tasks.get(vm)
            if task is not None:
                total = p.bytes_done + p.bytes_remaining
                self.bar.update(task, description=_describe(p),  # type: ignore[arg-type]
                                total=total or None, completed=p.bytes_done)

    def guest_done(self, outcome: ops.GuestOutcome) -> None:
        with self._lock:
            task = self.tasks.pop(outcome.vm, None)
            if task is not None:
                self.bar.remove_task(task)  # type: ignore[arg-type]
        super().guest_done(outcome)

    def close(self) -> None:
        self.bar.stop()


def reporter_for(a: argparse.Namespace) -> LineReporter:
    if a.json:
        return LineReporter(quiet=True)
    if sys.stderr.isatty() and sys.stdout.isatty():
        return LiveReporter()
    return LineReporter()


def guest_line(g: ops.GuestOutcome) -> str:
    if g.moved:
        text = (f"{g.vm}: moved {g.source} -> {g.destination} in {g.seconds:.1f} s "
                f"(downtime {g.downtime_ms:.1f} ms)")
    else:
        text = f"{g.vm}: stayed on {g.source}: {g.error}"
    for n in g.notes:
        text += f" [{n}]"
    return text


# ---------------------------------------------------------------- helpers


def _cluster(s: Session, what: str) -> ops.Agents:
    if s.local_mode:
        raise CliError(f"no cluster is set up here: {what} works on the hosts of a cluster "
                       "('vmigrate up', or VMIGRATE_HOME of an existing one)")
    cfg = s.cfg
    return ops.Agents(s.store, lambda host, address: connect_agent(cfg, address, host))


def _host_list(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [h.strip() for h in v.split(",") if h.strip()]
    return out


def _drain_options(a: argparse.Namespace) -> ops.DrainOptions:
    if a.parallel < 1 or a.parallel > 64:
        raise CliError("--parallel must be 1 to 64")
    if a.downtime_ms < 0:
        raise CliError("--downtime-ms cannot be negative")
    if a.migration_timeout < 0:
        raise CliError("--migration-timeout cannot be negative")
    return ops.DrainOptions(parallel=a.parallel, to=_host_list(getattr(a, "to", None)),
                            downtime_ms=a.downtime_ms, timeout_s=a.migration_timeout)


def _run_interruptibly(job: Callable[[], object], cancel: Callable[[], None],
                       what: str) -> object:
    """Run `job` in a thread so that Ctrl-C cancels the moves in flight
    (their guests stay at their source) instead of abandoning them."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = job()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, name="operation", daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.2)
    except KeyboardInterrupt:
        cancel()
        t.join(120)
        raise CliError(f"interrupted: {what}") from None
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("result")


# ---------------------------------------------------------------- commands


def cmd_drain(s: Session, a: argparse.Namespace) -> int:
    agents = _cluster(s, "drain")
    opts = _drain_options(a)
    rep = reporter_for(a)
    d = ops.Drain(s.store, agents, a.host, opts, rep)
    try:
        report = _run_interruptibly(
            d.run, d.cancel, f"moves in flight were cancelled and their guests stay where they "
                             f"were; {a.host} stays drained")
    except ops.OperationError as e:
        raise CliError(str(e)) from None
    finally:
        rep.close()
        agents.close()
    assert isinstance(report, ops.DrainReport)
    if a.json:
        output.print_json(report.to_dict())
    else:
        for n in report.notes:
            print(f"note: {n}")
        print(f"{a.host} drained: {len(report.moved)} guests moved, {len(report.stayed)} stayed"
              f" ({report.seconds:.1f} s)")
    if report.stayed:
        names = ", ".join(g.vm for g in report.stayed)
        raise CliError(f"{len(report.stayed)} guests stayed on {a.host} ({names}); {a.host} "
                       "stays drained")
    return 0


def cmd_undrain(s: Session, a: argparse.Namespace) -> int:
    try:
        rec = ops.undrain(s.store, a.host)
    except ops.OperationError as e:
        raise CliError(str(e)) from None
    if a.json:
        output.print_json({"host": rec.name, "schedulable": rec.schedulable,
                           "alive": rec.alive})
    else:
        print(f"{rec.name} is schedulable again" +
              ("" if rec.alive else " (its agent is down: nothing runs there until it is back)"))
    return 0


def cmd_rolling_upgrade(s: Session, a: argparse.Namespace) -> int:
    agents = _cluster(s, "rolling-upgrade")
    if not a.command.strip():
        raise CliError("--command is empty")
    if a.timeout <= 0:
        raise CliError("--timeout must be positive")
    opts = ops.RollingOptions(command=a.command, hosts=_host_list(a.hosts), home=str(home()),
                              timeout_s=a.timeout, drain=_drain_options(a))
    rep = reporter_for(a)
    # The command's own output goes to stderr, so --json output stays parseable.
    ru = ops.RollingUpgrade(s.store, agents, opts, rep, command_output=sys.stderr.fileno())
    try:
        steps = _run_interruptibly(ru.run, ru.cancel, "the host being drained stays drained "
                                                      "and every guest runs where it was")
    except ops.RollingUpgradeStopped as e:
        if a.json:
            output.print_json({"ok": False, "error": str(e),
                               "hosts": [st.to_dict() for st in e.steps],
                               "guests": e.placement})
        raise CliError(str(e)) from None
    except ops.OperationError as e:
        raise CliError(str(e)) from None
    finally:
        rep.close()
        agents.close()
    assert isinstance(steps, list)
    if a.json:
        output.print_json({"ok": True, "hosts": [st.to_dict() for st in steps]})
    else:
        output.table(["host", "before", "after", "guests moved", "drain", "command", "back in"],
                     [(st.host, st.version_before, st.version_after, st.guests_moved,
                       f"{st.drain_s:.1f}s", f"{st.command_s:.1f}s", f"{st.back_s:.1f}s")
                      for st in steps])
        print(f"rolling upgrade done: {len(steps)} hosts")
    return 0


def cmd_upgrade(s: Session, a: argparse.Namespace) -> int:
    from vmigrate.cli.main import rpc

    host = s.host_of(a.name)
    stream = s.agent(host).Upgrade(agent_pb2.VmRef(name=a.name))
    try:
        last = rpc(lambda: output.follow_progress(stream, f"upgrade {a.name}", a.json),
                   "upgrade")
    except CliError as e:
        if "vmigrate.migrate.upgrade" in str(e):        # an agent older than 0.2.0
            raise CliError(f"the agent on {host} is too old to upgrade guests in place: "
                           "upgrade it first (vmigrate rolling-upgrade)") from None
        raise
    except KeyboardInterrupt:
        stream.cancel()
        raise CliError(f"interrupted: the upgrade was cancelled unless it had switched; "
                       f"'vmigrate ps' shows {a.name}'s VMM") from None
    assert isinstance(last, agent_pb2.Progress)
    r = last.migration
    if a.json:
        output.print_json(r)
    else:
        print(f"{a.name} runs in a new VMM on {host}: downtime {r.downtime_ms:.1f} ms, "
              f"{human_bytes(r.bytes_on_wire)} copied (state and console); "
              f"{human_bytes(r.guest_bytes)} of memory handed over, not copied")
    return 0


def register(cmd: Callable) -> None:
    def drain_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--parallel", type=int, default=2, metavar="N",
                       help="guests moved at the same time (default 2)")
        p.add_argument("--downtime-ms", type=int, default=0,
                       help="acceptable downtime per guest (default: as 'send')")
        p.add_argument("--migration-timeout", type=float, default=0.0, metavar="S",
                       help="give up on a guest that does not converge within S seconds "
                            "(it stays)")

    p = cmd("drain", cmd_drain, "move every guest off a host and mark it unschedulable",
            "The host is marked unschedulable first, so nothing new lands there. Each\n"
            "guest live-migrates to the alive, schedulable host with the most free\n"
            "memory (or one of --to). A guest that cannot move stays where it is and\n"
            "is reported; the exit status is then 1. 'vmigrate undrain HOST' re-admits\n"
            "the host. Ctrl-C cancels the moves in flight (those guests stay).\n\n"
            "examples:\n  vmigrate drain host1\n  vmigrate drain host1 --parallel 4\n"
            "  vmigrate drain host1 --to host2 --to host3")
    p.add_argument("host")
    p.add_argument("--to", action="append", metavar="HOST",
                   help="only move guests to this host (repeat, or HOST1,HOST2)")
    drain_flags(p)

    p = cmd("undrain", cmd_undrain, "re-admit a drained host (schedulable again)")
    p.add_argument("host")

    p = cmd("rolling-upgrade", cmd_rolling_upgrade,
            "drain, upgrade and re-admit hosts one at a time",
            "For each host in turn: drain it, run CMD with VMIGRATE_HOST (its name),\n"
            "VMIGRATE_HOST_ADDRESS (its agent's address), VMIGRATE_HOME and\n"
            "VMIGRATE_STORE set, wait until its agent registers again (a new lease)\n"
            "and answers, then re-admit it. CMD must upgrade and restart that host's\n"
            "agent. It stops at the first failure, with every guest running somewhere,\n"
            "and says where things stand; the host it stopped at stays drained.\n\n"
            "example:\n"
            "  vmigrate rolling-upgrade --command 'ssh $VMIGRATE_HOST \"apt-get install -y "
            "vmigrate && systemctl restart vmigrated\"'")
    p.add_argument("--command", required=True, metavar="CMD",
                   help="shell command that upgrades and restarts one host's agent")
    p.add_argument("--hosts", action="append", metavar="H1,H2",
                   help="hosts in this order (default: every host, by name)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="per host: CMD plus the agent coming back (default 300)")
    drain_flags(p)

    p = cmd("upgrade", cmd_upgrade, "move a guest into a fresh VMM on the same host",
            "Same-host live update: the new VMM maps the guest's memory (a memfd)\n"
            "instead of copying it, so only the vCPU and device state is copied and\n"
            "the guest pauses for milliseconds. Use it after upgrading vmigrate on a\n"
            "host, so running guests pick up the new VMM. Until the new VMM runs, any\n"
            "failure leaves the guest in its old VMM.\n\n"
            "example:\n  vmigrate upgrade vm1 --json")
    p.add_argument("name")

