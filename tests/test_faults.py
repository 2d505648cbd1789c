"""The fault matrix (issue 8): a process killed, the network cut, lossy, slow
or frozen, a chunk corrupted in flight or aimed outside guest memory, at each
phase of a live migration (negotiate, pre-copy, stop-and-copy, commit); a full
disk and a killed agent during a checkpoint.

Every cell ends with the same verdict, after the cluster has settled: exactly
one copy of the guest exists (one live VMM process across all hosts, one line
in `vmigrate ps --all`, the store's owner is that host, no migration left
pending, no orphaned VMM process), it runs, and the test guest's own
self-check is clean with its heartbeat counter continuing where it was.

Hold points (migrate/faults.py) make the short phases deterministic: the
agents run with `VMIGRATE_HOLD="source:stop-and-copy=2"` (etc.), the test
waits for the agent's "holding ... at source:stop-and-copy" log line and
breaks things while the agent waits there. Killed agents are started again
half a second later, as systemd would.

Corruption in flight needs bytes a proxy can read, so those cells run on a
second cluster made with plaintext agents (`--insecure`): a small proxy in
front of host2 understands just enough HTTP/2 and gRPC framing to flip one
byte of page data of one message; the page checksum must catch it. (With
mutual TLS the TLS record MAC would catch it first.) A chunk outside guest
memory is pushed by a test client holding an agent certificate of the cluster,
into the very migration under way (its id read from the store).

A checkpoint has no hold points; its cells catch the agent at the right
moment by freezing it (SIGSTOP) again and again for a few milliseconds until
the temporary file exists (memory being written) or the guest is paused (the
last pages), then fill the disk or kill the agent while it is frozen.

The module prints the matrix as a table at the end; docs/faults.md keeps the
results of a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tests.cluster import VMIGRATE, NetnsCluster
from vmigrate.migrate import pagestream, pki, snapfile, store
from vmigrate.migrate.pages import PAGE, RAW, Chunk
from vmigrate.proto import agent_pb2, agent_pb2_grpc
from vmigrate.vmm.client import VmmClient, VmmError, pid_alive, read_pid

pytestmark = pytest.mark.netns

PHASES = ("negotiate", "pre-copy", "stop-and-copy", "commit")
HOLD_S = 1.5
HOLD_POINT = {"negotiate": "source:negotiate", "pre-copy": "source:precopy",
              "stop-and-copy": "source:stop-and-copy", "commit": "destination:commit"}
SRC, DST = "host1", "host2"
GUEST = ("--memory", "64M", "--working-set", "4M", "--dirty-rate", "8M",
         "--heartbeat-ms", "200")
WS_PAGES = 4 * 256
SETTLE_S = 30.0          # how long the cluster may take to reach one copy again
SEND_TIMEOUT_S = 150.0
RESTART_AFTER_S = 0.5    # systemd's Restart=on-failure, give or take
CUT_MAX_S = 14.0         # longer than gRPC keepalive needs to notice (5 s + 5 s)
FREEZE_S = 11.0


# ---------------------------------------------------------------- results


@dataclass
class Cell:
    fault: str
    phase: str
    result: str = "not run"          # PASS / FAIL
    outcome: str = ""                # where the guest runs afterwards
    seconds: float = 0.0
    note: str = ""

    def add(self, note: str) -> None:
        self.note = f"{self.note}; {note}" if self.note else note


RESULTS: dict[tuple[str, str], Cell] = {}
NOT_APPLICABLE = {
    ("corrupt chunk in flight", "negotiate"): "no memory travels before pre-copy",
    ("corrupt chunk in flight", "commit"): "no memory travels after the switchover",
    ("kill source agent, guest throttled", "negotiate"): "nothing is throttled before pre-copy",
    ("kill source agent, guest throttled", "stop-and-copy"): "the guest is paused: see the "
                                                             "kill source agent row",
    ("kill source agent, guest throttled", "commit"): "the guest is paused: see the "
                                                      "kill source agent row",
    ("fill the disk (checkpoint)", "negotiate"): "a checkpoint has no negotiation",
    ("fill the disk (checkpoint)", "commit"): "a checkpoint commits with a rename only",
    ("kill the checkpointing agent", "negotiate"): "a checkpoint has no negotiation",
    ("kill the checkpointing agent", "commit"): "a checkpoint commits with a rename only",
}


def _table() -> str:
    faults: list[str] = []
    for fault, _phase in [*RESULTS, *NOT_APPLICABLE]:
        if fault not in faults:
            faults.append(fault)
    rows = [["fault", *PHASES]]
    for fault in faults:
        row = [fault]
        for phase in PHASES:
            cell = RESULTS.get((fault, phase))
            if cell is not None:
                row.append(f"{cell.result} {cell.outcome} {cell.seconds:.0f}s".strip())
            elif (fault, phase) in NOT_APPLICABLE:
                row.append("n/a")
            else:
                row.append("-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {c.fault} @ {c.phase}: {c.note}" for c in RESULTS.values() if c.note]
    notes += [f"  {fault} @ {phase}: n/a, {why}" for (fault, phase), why in NOT_APPLICABLE.items()
              if fault in {f for f, _ in RESULTS}]
    return "\n".join(["", "fault matrix (outcome: where the guest runs afterwards)", *lines,
                      *(["notes:", *notes] if notes else [])])


@pytest.fixture(scope="module", autouse=True)
def matrix_table(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    text = _table()
    out = os.environ.get("VMIGRATE_FAULT_TABLE")
    if out:
        Path(out).write_text(text + "\n" + json.dumps(
            [c.__dict__ for c in RESULTS.values()], indent=1) + "\n")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        for line in text.splitlines():
            reporter.write_line(line)


@contextlib.contextmanager
def cell(fault: str, phase: str) -> Iterator[Cell]:
    c = Cell(fault, phase)
    RESULTS[(fault, phase)] = c
    t0 = time.monotonic()
    try:
        yield c
        c.result = "PASS"
    except BaseException as e:
        c.result = "FAIL"
        c.add(str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
        raise
    finally:
        c.seconds = time.monotonic() - t0


# ---------------------------------------------------------------- the cluster


class FaultCluster(NetnsCluster):
    """A NetnsCluster whose agents can be restarted with hold points, and
    that can say how many copies of a guest exist."""

    holds: dict[str, str]

    def setup_faults(self) -> None:
        self.holds = dict.fromkeys(self.hosts, "")
        self._store: store.ClusterStore | None = None

    @property
    def store(self) -> store.ClusterStore:
        if self._store is None:
            self._store = store.open_store(self.cfg.store_url)
        return self._store

    def state_dir(self, host: str) -> Path:
        return self.home / "cluster" / "hosts" / host

    def agent_alive(self, host: str) -> bool:
        try:
            return pid_alive(self.agent_pid(host))
        except (OSError, ValueError):
            return False

    def use_holds(self, spec: str) -> None:
        """Every agent runs with hold points `spec` (restarting those that do not)."""
        for host in self.hosts:
            if self.holds.get(host) != spec or not self.agent_alive(host):
                if self.agent_alive(host):
                    self.stop_agent(host)
                self.start(host, spec)

    def start(self, host: str, spec: str | None = None) -> None:
        spec = self.holds.get(host, "") if spec is None else spec
        self.restart_agent(host, hold=spec)
        self.holds[host] = spec

    def log_size(self, host: str) -> int:
        with contextlib.suppress(OSError):
            return (self.state_dir(host) / "agent.log").stat().st_size
        return 0

    def wait_log(self, host: str, needle: str, offset: int, timeout: float = 60.0,
                 until: Callable[[], bool] | None = None) -> bool:
        """Wait for `needle` in host's agent log past `offset`; False if `until()`
        turned true first (the operation ended without reaching it)."""
        path = self.state_dir(host) / "agent.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), open(path, "rb") as f:
                f.seek(offset)
                if needle.encode() in f.read():
                    return True
            if until is not None and until():
                return False
            time.sleep(0.03)
        raise AssertionError(f"{host}: no {needle!r} in the agent log within {timeout:.0f}s")

    def vmm_dirs(self, host: str, name: str) -> list[Path]:
        d = self.state_dir(host) / "vms" / name
        return [d] if d.is_dir() else []

    def vmm_pid(self, host: str, name: str) -> int | None:
        for d in self.vmm_dirs(host, name):
            pid = read_pid(d)
            if pid and pid_alive(pid):
                return pid
        return None

    def standby_pids(self, host: str) -> list[int]:
        out = []
        for d in (self.state_dir(host) / "vms").glob(".standby-*"):
            pid = read_pid(d)
            if pid and pid_alive(pid):
                out.append(pid)
        return out

    def orphan_vmms(self) -> list[int]:
        """VMM processes of this cluster that no state directory accounts for."""
        known = set()
        for host in self.hosts:
            for d in (self.state_dir(host) / "vms").iterdir():
                pid = read_pid(d)
                if pid:
                    known.add(pid)
        root = str(self.home)
        found = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                argv = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"vmigrate.vmm" in argv and any(a.decode(errors="replace").startswith(root)
                                              for a in argv):
                pid = int(p.name)
                if pid not in known and pid_alive(pid):
                    found.append(pid)
        return found

    # Reading what agents say, in-process (the CLI costs 0.6 s of start-up a call).
    def _call(self, host: str, fn: Callable[[agent_pb2_grpc.AgentStub], object]) -> object:
        from vmigrate.cli.context import connect_agent, stub_for

        ch = connect_agent(self.cfg, self.store.get_host(host).address, host)
        try:
            return fn(stub_for(ch))
        finally:
            ch.close()

    def logs(self, name: str) -> str:
        def read(stub: agent_pb2_grpc.AgentStub) -> bytes:
            return b"".join(c.data for c in stub.ReadConsole(
                agent_pb2.ReadConsoleRequest(name=name), timeout=20))
        try:
            data = self._call(self.store.get_vm(name).owner, read)
        except (grpc.RpcError, store.StoreError) as e:
            raise AssertionError(f"cannot read the console of {name}: {e}") from None
        return data.decode("ascii", errors="replace")  # type: ignore[union-attr]

    def list_vms(self) -> tuple[list[agent_pb2.VmInfo], list[str]]:
        vms, problems = [], []
        for host in self.hosts:
            try:
                vms += self._call(host, lambda s: s.ListVms(agent_pb2.AgentEmpty(),
                                                            timeout=10)).vms  # type: ignore
            except (grpc.RpcError, store.StoreError) as e:
                problems.append(f"ListVms on {host}: {e}")
        return vms, problems

    def census(self, name: str, cli: bool = False) -> tuple[str | None, list[str]]:
        """(the host that runs `name`, []) when exactly one copy exists and every
        view agrees, else (None, what disagrees). `cli`: ask `vmigrate ps --all`."""
        problems = []
        for host in self.hosts:
            if not self.agent_alive(host):
                problems.append(f"agent {host} is not running")
        vmms = {h: pid for h in self.hosts if (pid := self.vmm_pid(h, name))}
        if len(vmms) != 1:
            problems.append(f"VMM processes for {name}: {vmms or 'none'}")
        if cli:
            try:
                ps = [(v["host"], v["state"]) for v in self.json("ps", "--all", timeout=60)
                      if v["name"] == name]
            except (AssertionError, subprocess.TimeoutExpired, ValueError) as e:
                ps = []
                problems.append(f"ps --all failed: {e}")
        else:
            infos, errors = self.list_vms()
            problems += errors
            ps = [(v.host, v.state) for v in infos if v.name == name]
        if len(ps) != 1 or ps[0][1] != "running":
            problems.append("ps --all: " + (", ".join(f"{h}:{st}" for h, st in ps)
                                            or "nothing"))
        try:
            owner = self.store.get_vm(name).owner
            mig = self.store.get_migration(name)
        except store.StoreError as e:
            owner, mig = None, None
            problems.append(f"store: {e}")
        if mig is not None and mig.state == store.MigrationState.PENDING:
            problems.append(f"store: migration {mig.migration_id} still pending")
        hosts = {owner, *vmms, *(h for h, _ in ps)}
        if len(hosts) != 1:
            problems.append(f"owner {owner}, VMMs on {sorted(vmms)}, "
                            f"ps says {[h for h, _ in ps]}")
        for host in vmms:
            client = VmmClient(self.state_dir(host) / "vms" / name)
            with contextlib.suppress(VmmError):
                throttle = client.status(timeout=5).throttle_percent
                if throttle:
                    problems.append(f"the guest is left throttled at {throttle}%")
            client.close()
        orphans = self.orphan_vmms()
        if orphans:
            problems.append(f"orphaned VMM processes {orphans}")
        return (None, problems) if problems else (owner, [])

    def settle(self, name: str, timeout: float = SETTLE_S) -> str:
        """Wait until exactly one copy of `name` exists; returns its host
        (confirmed through `vmigrate ps --all` as a user would see it)."""
        deadline = time.monotonic() + timeout
        while True:
            host, problems = self.census(name)
            if host is not None:
                host, problems = self.census(name, cli=True)
                if host is not None:
                    return host
            if time.monotonic() > deadline:
                raise AssertionError(f"no single copy of {name} after {timeout:.0f}s: "
                                     + "; ".join(problems))
            time.sleep(0.5)

    def remove_guest(self, name: str) -> None:
        """Best effort, so a failed cell does not disturb the next."""
        with contextlib.suppress(grpc.RpcError, store.StoreError):
            self._call(self.store.get_vm(name).owner,
                       lambda s: s.StopVm(agent_pb2.VmRef(name=name), timeout=30))
        for host in self.hosts:
            pid = self.vmm_pid(host, name)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for d in self.vmm_dirs(host, name):
                shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(store.StoreError):
            mig = self.store.get_migration(name)
            if mig is not None:
                self.store.abort_migration(name, mig.migration_id)
                self.store.finish_migration(name, mig.migration_id)
        with contextlib.suppress(store.StoreError):
            self.store.delete_vm(name, self.store.get_vm(name).owner)

    def rogue_push(self, host: str, frames: list[bytes]) -> tuple[grpc.StatusCode, str]:
        """Push page frames into `host`'s agent as a peer holding a valid agent
        certificate of this cluster (a buggy or compromised source)."""
        pki_dir = self.home / "cluster" / "pki"
        tls = self.home / "rogue"
        paths = pki.CertPaths.in_dir(tls, "agent", "rogue")
        if not paths.cert.exists():
            pki.issue_certificate(pki_dir, "agent", "rogue", tls)
        ch = pki.connect(f"{self.hosts[host].ip}:7070", paths, agent_name=host)
        try:
            ack = pagestream.push_callable(ch)(iter(frames), timeout=20)
            return grpc.StatusCode.OK, f"{ack.pages} pages accepted"
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
        finally:
            ch.close()

    def close(self) -> None:
        if getattr(self, "_store", None) is not None:
            with contextlib.suppress(Exception):
                self._store.close()
        super().close()


def _make_home() -> Path:
    return Path(tempfile.mkdtemp(prefix="vmf", dir="/tmp"))


@pytest.fixture(scope="module")
def fc() -> Iterator[FaultCluster]:
    home = _make_home()
    c = FaultCluster(home, hosts=2)
    c.setup_faults()
    try:
        yield c
    finally:
        c.close()
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------- one migration, one fault


@dataclass
class Send:
    """`vmigrate send` running in the background."""

    proc: subprocess.Popen
    out: str = ""
    err: str = ""
    rc: int | None = None
    ended: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, c: FaultCluster, name: str, *args: str) -> Send:
        p = subprocess.Popen([*VMIGRATE, "send", DST, name, "--json", *args], env=c.env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        s = cls(p)
        threading.Thread(target=s._wait, daemon=True).start()
        return s

    def _wait(self) -> None:
        try:
            self.out, self.err = self.proc.communicate(timeout=SEND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.out, self.err = self.proc.communicate()
            self.err += f"\n(killed: no answer in {SEND_TIMEOUT_S:.0f}s)"
        self.rc = self.proc.returncode
        self.ended.set()

    def wait(self, timeout: float = SEND_TIMEOUT_S + 10) -> None:
        assert self.ended.wait(timeout), "vmigrate send did not end"

    def summary(self) -> str:
        if self.rc == 0:
            return "send ok"
        lines = [ln for ln in self.err.strip().splitlines() if ln.strip()]
        return f"send failed: {lines[-1][:160] if lines else self.rc}"


@dataclass
class Recovery:
    """What to undo after a fault: when the send ends, or `after_s` at the latest."""

    action: Callable[[], None]
    after_s: float | None = None


Inject = Callable[["FaultCluster", str, str, Cell], "Recovery | None"]


def _ready(c: FaultCluster, name: str) -> int:
    """Wait until the guest has rewritten its working set once (so there is
    real data to move); returns its last heartbeat number."""
    deadline = time.monotonic() + 30
    while True:
        hb = c.report(name).last(0)
        if hb is not None and hb.writes >= WS_PAGES:
            return hb.n
        assert time.monotonic() < deadline, f"{name} did not fill its working set"
        time.sleep(0.2)


def _continues(c: FaultCluster, name: str, before_n: int) -> None:
    """The guest's own verdict: counting on from before the fault, clean."""
    r = c.wait_heartbeats(name, 2, after=c.report(name).last(0).n, timeout=30)
    assert r.clean(), f"guest {name}: {r.problems[:3]} {r.gaps()[:3]}"
    assert r.heartbeats[0][0].n <= before_n, f"{name}: history before the fault was lost"
    assert any(hb.n == before_n for hb in r.heartbeats[0]), f"{name}: heartbeat gap"


def _guest_name(fault: str, phase: str) -> str:
    """A short unique VM name per cell, e.g. kda-pre-copy for "kill destination agent"."""
    initials = "".join(w[0] for w in fault.replace("%", "").split() if w[0].isalnum())
    return f"{initials.lower()}-{phase}"


def run_cell(c: FaultCluster, fault: str, phase: str, inject: Inject,
             expect_host: str | None = None, guest: tuple[str, ...] = GUEST,
             check: Callable[[Send, Cell], None] | None = None,
             send_args: tuple[str, ...] = ()) -> Cell:
    """Boot a guest on host1, send it to host2 holding at `phase`, break
    things there, let the cluster settle, then judge."""
    name = _guest_name(fault, phase)
    spec = f"{HOLD_POINT[phase]}={HOLD_S}"
    with cell(fault, phase) as res:
        c.use_holds(spec)
        c.run("run", name, "--test-guest", "--on", SRC, *guest)
        try:
            before = _ready(c, name)
            side, point = HOLD_POINT[phase].split(":")
            holder = SRC if side == "source" else DST
            offset = c.log_size(holder)
            send = Send.start(c, name, *send_args)
            reached = c.wait_log(holder, f"at {side}:{point}", offset,
                                 until=send.ended.is_set)
            assert reached, f"the migration ended before {phase}: {send.summary()}"
            recovery = inject(c, name, phase, res)
            if recovery is not None:
                if recovery.after_s is None:
                    send.wait()
                else:
                    send.ended.wait(recovery.after_s)
                recovery.action()
            send.wait()
            res.add(send.summary())
            host = c.settle(name)
            _continues(c, name, before)
            res.outcome = f"-> {host}"
            if expect_host is not None:
                assert host == expect_host, f"expected the guest on {expect_host}, it is on {host}"
            if check is not None:
                check(send, res)
        finally:
            c.remove_guest(name)
    return res


# ---------------------------------------------------------------- the faults


def kill_dst_vmm(c: FaultCluster, name: str, phase: str, res: Cell) -> Recovery | None:
    """The destination's VMM for the guest; before Prepare there is none yet,
    so the standby VMM that Prepare would turn into it."""
    pid = c.vmm_pid(DST, name)
    pids = [pid] if pid else c.standby_pids(DST)
    assert pids, "no destination VMM to kill"
    if not pid:
        res.add("killed the standby VMM")
    for p in pids:
        os.kill(p, signal.SIGKILL)
    return None


def _kill_agent(host: str) -> Inject:
    def inject(c: FaultCluster, name: str, phase: str, res: Cell) -> Recovery:
        c.stop_agent(host, kill=True)
        return Recovery(lambda: c.start(host), after_s=RESTART_AFTER_S)
    return inject


def cut_link(c: FaultCluster, name: str, phase: str, res: Cell) -> Recovery:
    h = c.hosts[DST]
    h.cut()
    return Recovery(h.heal, after_s=CUT_MAX_S)


def loss_and_delay(c: FaultCluster, name: str, phase: str, res: Cell) -> Recovery:
    h = c.hosts[DST]
    h.netem(delay_ms=5, loss_pct=2)
    return Recovery(h.clear_faults, after_s=None)


def freeze_dst_agent(c: FaultCluster, name: str, phase: str, res: Cell) -> Recovery:
    pid = c.agent_pid(DST)
    os.kill(pid, signal.SIGSTOP)
    return Recovery(lambda: os.kill(pid, signal.SIGCONT), after_s=FREEZE_S)


MIGRATION_FAULTS: dict[str, tuple[Inject, dict[str, str]]] = {
    # fault: (inject, where the guest must end up, per phase, where that is certain)
    "kill destination VMM": (kill_dst_vmm, {"pre-copy": SRC, "stop-and-copy": SRC,
                                            "commit": SRC}),
    "kill destination agent": (_kill_agent(DST), {"pre-copy": SRC, "stop-and-copy": SRC,
                                                  "commit": DST}),
    "kill source agent": (_kill_agent(SRC), {"negotiate": SRC, "commit": DST}),
    "cut the link": (cut_link, {"commit": DST}),
    "loss 2% + delay 5 ms": (loss_and_delay, {}),
    "freeze destination agent": (freeze_dst_agent, {"commit": DST}),
}


@pytest.mark.parametrize(("fault", "phase"), [
    (f, p) for p in PHASES for f in MIGRATION_FAULTS])
def test_migration_fault(fc, fault, phase):
    inject, where = MIGRATION_FAULTS[fault]
    run_cell(fc, fault, phase, inject, expect_host=where.get(phase))


def kill_source_agent_while_throttled(c: FaultCluster, name: str, phase: str,
                                      res: Cell) -> Recovery:
    """Wait until pre-copy throttles the guest's vCPUs (it cannot converge on
    the capped link), then kill the source agent."""
    client = VmmClient(c.state_dir(SRC) / "vms" / name)
    try:
        deadline = time.monotonic() + 60
        while (throttle := client.status(timeout=5).throttle_percent) == 0:
            assert time.monotonic() < deadline, "pre-copy never throttled the guest"
            time.sleep(0.05)
    finally:
        client.close()
    res.add(f"killed at throttle {throttle}%")
    return _kill_agent(SRC)(c, name, phase, res)


def test_source_agent_killed_while_the_guest_is_throttled(fc):
    """A restarted source agent must give a guest back its full speed (and
    stop the dirty log) when it abandons the migration the old agent ran."""
    hot = ("--memory", "128M", "--working-set", "64M", "--dirty-rate", "64M",
           "--heartbeat-ms", "200")
    run_cell(fc, "kill source agent, guest throttled", "pre-copy",
             kill_source_agent_while_throttled, expect_host=SRC, guest=hot,
             send_args=("--bandwidth", "20M", "--compress", "off"))


# ---------------------------------------------------------------- corruption in flight


def _varint(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """A protobuf varint at `pos`: (value, next position), or None if incomplete."""
    value = shift = 0
    while pos < len(buf):
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7
    return None


MORE = -1     # the walker needs more bytes


class _Incomplete(Exception):
    pass


def _fields(msg: bytearray, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """The fields of a serialized message in msg[start:end]: (field number,
    wire type, value start, value end); raises _Incomplete where bytes are
    missing, stops at a wire type it cannot skip."""
    pos = start
    while pos < end:
        tag = _varint(msg, pos)
        if tag is None:
            raise _Incomplete
        field_no, wire = tag[0] >> 3, tag[0] & 7
        pos = tag[1]
        if wire in (0, 2):
            v = _varint(msg, pos)
            if v is None:
                raise _Incomplete
            value_start, value_end = (v[1], v[1] + v[0]) if wire == 2 else (pos, v[1])
        elif wire in (1, 5):
            value_start, value_end = pos, pos + (8 if wire == 1 else 4)
        else:
            return
        yield field_no, wire, value_start, value_end
        pos = value_end


def _chunk_data_target(msg: bytearray, start: int, end: int) -> int | None:
    """Inside a serialized MemoryChunk at [start, end): the middle of its data."""
    for field_no, wire, v_start, v_end in _fields(msg, start, end):
        if wire == 2 and field_no == 4 and v_end - v_start >= 64:    # MemoryChunk.data
            return v_start + (v_end - v_start) // 2
    return None


def _switchover_target(msg: bytearray, total: int) -> int | None:
    """The offset of a byte of page data in the first chunk of a
    SwitchoverRequest's last_pages (field 6) that has any, MORE, or None."""
    try:
        for field_no, wire, v_start, v_end in _fields(msg, 0, total):
            if wire == 2 and field_no == 6:
                t = _chunk_data_target(msg, v_start, v_end)
                if t is not None:
                    return t
    except _Incomplete:
        return MORE
    return None


@dataclass
class _Stream:
    prefix: bytearray = field(default_factory=bytearray)
    length: int | None = None          # of the gRPC message being received
    msg: bytearray = field(default_factory=bytearray)
    selected: bool | None = None
    target: int | None = None


class CorruptingProxy:
    """TCP proxy to one agent that flips one byte of guest page data in one
    gRPC message on its way in, when armed.

    It follows the HTTP/2 frames of each connection (client to server) and the
    gRPC messages inside each stream's DATA frames. Armed with "pages" it
    flips a byte in the data area of the n-th page-stream frame ("VMPG"...);
    armed with "switchover" a byte of page data in the first chunk of the next
    SwitchoverRequest's last pages (or of the next page-stream frame, if the
    last pages are streamed). Nothing else is touched.
    """

    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def __init__(self, listen_ip: str, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.create_server((listen_ip, 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.mode = ""
        self.nth = 0
        self.seen = 0
        self.flips: list[str] = []
        self._conns: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="proxy").start()

    def arm(self, mode: str, nth: int = 1) -> None:
        with self.lock:
            self.mode, self.nth, self.seen = mode, nth, 0
            self.flips.clear()

    def disarm(self) -> None:
        with self.lock:
            self.mode = ""

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.close()
        for s in self._conns:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                if self._closed:
                    return
                continue
            server.settimeout(None)
            self._conns += [client, server]
            threading.Thread(target=self._pump_raw, args=(server, client), daemon=True).start()
            threading.Thread(target=self._pump_h2, args=(client, server), daemon=True).start()

    @staticmethod
    def _recv(s: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = s.recv(n - len(buf))
            if not got:
                raise EOFError
            buf += got
        return bytes(buf)

    def _pump_raw(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _pump_h2(self, src: socket.socket, dst: socket.socket) -> None:
        streams: dict[int, _Stream] = {}
        try:
            preface = self._recv(src, len(self.PREFACE))
            dst.sendall(preface)
            if preface != self.PREFACE:
                self._pump_raw(src, dst)
                return
            while True:
                head = self._recv(src, 9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                sid = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = bytearray(self._recv(src, length))
                if kind == 1:                                   # HEADERS: a new call
                    streams[sid] = _Stream()
                elif kind == 3:                                 # RST_STREAM
                    streams.pop(sid, None)
                elif kind == 0 and sid in streams:              # DATA
                    self._data(streams[sid], flags, payload)
                dst.sendall(head + payload)
        except (OSError, EOFError):
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _data(self, st: _Stream, flags: int, payload: bytearray) -> None:
        i, end = 0, len(payload)
        if flags & 0x8:                                         # PADDED
            i, end = 1, end - payload[0]
        while i < end:
            if st.length is None:
                take = min(5 - len(st.prefix), end - i)
                st.prefix += payload[i:i + take]
                i += take
                if len(st.prefix) == 5:
                    st.length = int.from_bytes(st.prefix[1:5], "big")
                    st.prefix.clear()
                    st.msg = bytearray()
                    st.selected, st.target = None, None
                continue
            take = min(st.length - len(st.msg), end - i)
            seg = len(st.msg)
            st.msg += payload[i:i + take]
            t = self._target(st)
            if t is not None and seg <= t < seg + take:
                payload[i + t - seg] ^= 0x5A
                with self.lock:
                    self.flips.append(f"byte {t} of a {st.length}-byte "
                                      f"{'page frame' if st.msg[:4] == b'VMPG' else 'message'}")
                st.target = None
                st.selected = False
            i += take
            if len(st.msg) == st.length:
                st.length = None

    def _target(self, st: _Stream) -> int | None:
        msg = st.msg
        if st.selected is None and len(msg) >= 4:
            with self.lock:
                page_frame = msg[:4] == b"VMPG"
                if self.mode == "pages" and page_frame:
                    self.seen += 1
                    st.selected = self.seen == self.nth
                elif self.mode == "switchover" and st.length is not None and \
                        st.length >= 1024:
                    st.selected = True
                    self.mode = ""
                else:
                    st.selected = False
        if not st.selected:
            return None
        if st.target is None:
            if msg[:4] == b"VMPG":
                if len(msg) < 12:
                    return None
                head_len = struct.unpack_from("<I", msg, 8)[0]
                start = 12 + head_len
                assert st.length is not None
                if st.length > start:
                    st.target = start + (st.length - start) // 2
            else:
                assert st.length is not None
                t = _switchover_target(msg, st.length)
                if t is None:
                    st.selected = False
                elif t != MORE:
                    st.target = t
        return st.target


class PlainCluster(FaultCluster):
    """host1 and host2 running plaintext agents (--insecure, as a local
    embedded cluster may), host2 reached through a CorruptingProxy."""

    def __init__(self, home: Path) -> None:
        from tests.netns import Network
        from vmigrate.cli.context import ClusterConfig

        self.home = home
        self.hosts = {}
        self.pythons = {}
        self.proxy: CorruptingProxy | None = None
        self.net = Network()
        self.net.start()
        cdir = home / "cluster"
        cdir.mkdir(parents=True)
        self.cfg = ClusterConfig(store_url=f"sqlite:///{cdir / 'cluster.db'}", insecure=True)
        try:
            for name in (SRC, DST):
                self.hosts[name] = self.net.add_host(name)
            self.proxy = CorruptingProxy(self.net.gateway, (self.hosts[DST].ip, 7070))
            self.setup_faults()
            for name in self.hosts:
                self.start(name, "")
            self.cfg.hosts = list(self.hosts)
            self.cfg.save(cdir / "cluster.json")
        except BaseException:
            self.close()
            raise

    def restart_agent(self, name: str, hold: str = "", python: str | None = None) -> None:
        from vmigrate.cli.cluster import agent_argv, start_agent

        h = self.hosts[name]
        argv = agent_argv(name, f"{h.ip}:7070", self.state_dir(name), self.cfg.store_url, None)
        if name == DST and self.proxy is not None:
            argv += ["--advertise", f"{self.net.gateway}:{self.proxy.port}"]
        env = {**os.environ, "VMIGRATE_HOLD": hold} if hold else None
        start_agent(argv, self.state_dir(name), netns_argv=h.netns_argv([]), env=env)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.proxy is not None:
                self.proxy.close()


@pytest.fixture(scope="module")
def plain() -> Iterator[PlainCluster]:
    home = _make_home()
    c = PlainCluster(home)
    try:
        yield c
    finally:
        c.close()
        shutil.rmtree(home, ignore_errors=True)


def _corrupt(mode: str) -> Inject:
    def inject(c: FaultCluster, name: str, phase: str, res: Cell) -> Recovery:
        proxy = c.proxy  # type: ignore[attr-defined]
        proxy.arm(mode, nth=2)
        return Recovery(proxy.disarm, after_s=None)
    return inject


@pytest.mark.parametrize("phase", ["pre-copy", "stop-and-copy"])
def test_corrupt_chunk_in_flight(plain, phase):
    """One byte of page data flipped between the agents (plaintext): the
    destination's checksum catches it, discards its copy, the source resumes."""
    def check(send: Send, res: Cell) -> None:
        flips = plain.proxy.flips
        assert len(flips) == 1, f"the proxy flipped {flips}"
        res.add(f"flipped {flips[0]}")
        assert send.rc != 0 and "checksum mismatch" in send.err, send.err
    # Raw pages, so every chunk carries page data to flip (a few dirty pages
    # of the test guest's pattern compress to chunks too small for the proxy
    # to pick). A hot guest and, at stop-and-copy, a generous downtime budget,
    # so the switchover comes right after the first round, with the pages
    # dirtied meanwhile still to send: a 20 ms budget can leave none.
    guest = ("--memory", "64M", "--working-set", "8M", "--dirty-rate", "32M",
             "--heartbeat-ms", "200")
    send_args = ("--compress", "off")
    if phase == "stop-and-copy":
        send_args += ("--downtime-ms", "500")
    run_cell(plain, "corrupt chunk in flight", phase,
             _corrupt("pages" if phase == "pre-copy" else "switchover"),
             expect_host=SRC, guest=guest, check=check, send_args=send_args)


OUTSIDE = 1 << 40      # far above any test guest's memory


def push_outside_memory(c: FaultCluster, name: str, phase: str, res: Cell) -> None:
    """A valid frame (right migration id, right checksum) whose one chunk
    lies outside guest memory, pushed into the destination at this phase."""
    mig = c.store.get_migration(name)
    mid = mig.migration_id if mig is not None else "0123456789abcdef"
    frame = pagestream.encode(mid, 1, [Chunk(OUTSIDE, 1, RAW, 0, b"\x5a" * PAGE)])
    code, details = c.rogue_push(DST, [frame])
    res.add(f"push: {code.name}")
    expected = {"negotiate": (grpc.StatusCode.NOT_FOUND, "no incoming migration"),
                "pre-copy": (grpc.StatusCode.DATA_LOSS, "outside guest memory"),
                "stop-and-copy": (grpc.StatusCode.DATA_LOSS, "outside guest memory"),
                "commit": (grpc.StatusCode.FAILED_PRECONDITION, "not ready for memory")}
    want_code, want_text = expected[phase]
    assert code == want_code and want_text in details, (code, details)
    return None


@pytest.mark.parametrize("phase", PHASES)
def test_chunk_outside_guest_memory(fc, phase):
    """Before the switchover the destination refuses the chunk and discards
    the incoming guest (the source resumes it); before Prepare and after the
    commit there is nothing to write into, and the frame is refused."""
    where = {"negotiate": DST, "pre-copy": SRC, "stop-and-copy": SRC, "commit": DST}
    run_cell(fc, "chunk outside guest memory", phase, push_outside_memory,
             expect_host=where[phase])


# ---------------------------------------------------------------- checkpoints


PAUSED = 3


def _vmm_state(c: FaultCluster, host: str, name: str) -> int:
    client = VmmClient(c.state_dir(host) / "vms" / name)
    try:
        return client.status(timeout=2).state
    except VmmError:
        return 0
    finally:
        client.close()


def _stopped(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] in "tT"
    return False


def freeze_when(pid: int, ready: Callable[[], bool], busy: Callable[[], bool],
                timeout: float = 60.0) -> bool:
    """Stop process `pid` (SIGSTOP) at a moment `ready()` is true, sampling
    by freezing it briefly again and again while `busy()`; returns True with
    the process left stopped, False if `busy()` ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and busy():
        os.kill(pid, signal.SIGSTOP)
        t = time.monotonic()
        while not _stopped(pid) and time.monotonic() - t < 1:
            time.sleep(0.0005)
        if ready():
            return True
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.002)
    return False


def _tmp_files(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


def _no_complete_file(d: Path, target: Path) -> None:
    """Nothing in `d` may look like a finished checkpoint."""
    assert not target.exists(), f"{target} exists after a failed checkpoint"
    for p in d.iterdir():
        if p.name.startswith("filler"):
            continue
        with pytest.raises(snapfile.SnapshotError):
            snapfile.load(p)


def checkpoint_cell(c: FaultCluster, fault: str, phase: str,
                    act: Callable[[Path, int], None], directory: Path) -> None:
    """Checkpoint a running guest on host1 into `directory`; freeze the agent
    at `phase` (memory being written while the guest runs, or the guest
    paused for the last pages), call act(directory, agent_pid), let go."""
    name = _guest_name(fault, phase)
    with cell(fault, phase) as res:
        c.use_holds("")
        c.run("run", name, "--test-guest", "--on", SRC, "--memory", "64M",
              "--working-set", "32M", "--dirty-rate", "64M", "--heartbeat-ms", "200")
        try:
            before = c.wait_heartbeats(name, 2).last(0).n
            target = directory / f"{name}.ckpt"
            p = subprocess.Popen([*VMIGRATE, "checkpoint", name, str(target), "--compress",
                                  "off"], env=c.env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            agent = c.agent_pid(SRC)
            if phase == "pre-copy":
                def ready() -> bool:
                    return bool(_tmp_files(directory)) and \
                        _vmm_state(c, SRC, name) != PAUSED
            else:
                def ready() -> bool:
                    return _vmm_state(c, SRC, name) == PAUSED
            try:
                caught = freeze_when(agent, ready, busy=lambda: p.poll() is None)
                assert caught, f"the checkpoint ended before {phase}: {p.communicate()}"
                act(directory, agent)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(agent, signal.SIGCONT)
            _out, err = p.communicate(timeout=120)
            assert p.returncode != 0, "the checkpoint succeeded despite the fault"
            res.add("checkpoint failed: " + (err.strip().splitlines() or ["?"])[-1][:120])
            _no_complete_file(directory, target)
            host = c.settle(name)
            assert host == SRC
            _continues(c, name, before)
            res.outcome = f"-> {host}"
            # and it can be checkpointed again, to a file that restores
            for f in directory.iterdir():
                f.unlink()
            c.run("checkpoint", name, str(target))
            snapfile.load(target)
        finally:
            c.remove_guest(name)
            with contextlib.suppress(OSError):
                for f in directory.iterdir():
                    f.unlink()


def _fill(directory: Path, agent: int) -> None:
    """Fill the file system (the agent is frozen meanwhile), then let it go on."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, PAGE):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\xff" * size):
                    pass
    finally:
        os.close(fd)
        os.kill(agent, signal.SIGCONT)


@pytest.fixture
def small_fs(fc) -> Iterator[Path]:
    d = fc.home / "smallfs"
    d.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(d)], check=True)
    try:
        # Mounts do not propagate here (/ is private): the agent must start
        # after the mount to see it.
        fc.use_holds("")
        fc.stop_agent(SRC)
        fc.start(SRC)
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("phase", ["pre-copy", "stop-and-copy"])
def test_disk_fills_during_checkpoint(fc, small_fs, phase):
    """The disk fills while the checkpoint writes memory, or while the guest is
    paused for its last pages: the checkpoint fails in one line, leaves no
    file that looks complete, and the guest keeps running."""
    def act(d: Path, agent: int) -> None:
        _fill(d, agent)
    checkpoint_cell(fc, "fill the disk (checkpoint)", phase, act, small_fs)


@pytest.mark.parametrize("phase", ["pre-copy", "stop-and-copy"])
def test_agent_killed_during_checkpoint(fc, phase):
    """The agent (the process writing the checkpoint) is killed and restarted:
    no file looks complete; the guest runs on (or is resumed on restart)."""
    d = fc.home / "ckpt"
    d.mkdir(exist_ok=True)

    def act(directory: Path, agent: int) -> None:
        os.kill(agent, signal.SIGKILL)
        os.kill(agent, signal.SIGCONT)
        time.sleep(RESTART_AFTER_S)
        fc.start(SRC)
    checkpoint_cell(fc, "kill the checkpointing agent", phase, act, d)
