"""Multi-host test networks built from Linux network namespaces, with fault injection.

One ``Network`` is a small LAN::

    root namespace             switch namespace "<prefix>"      host namespace "<prefix>-<name>"
    <prefix>  10.231.X.1/24 ═══ uplink ─┐
                                        br0 ─── p-<name> ═══════ eth0  10.231.X.N/24
                                        └────── p-<other> ══════ eth0  10.231.X.M/24

``═══`` are veth pairs.  Every host has ``lo`` up, ``eth0`` and a default route via
10.231.X.1, the root namespace's address, so test code in the root namespace (the CLI)
reaches every host and every host reaches the root namespace.

Why the bridge sits in a namespace of its own rather than in the root one: with
br_netfilter loaded (Docker, Kubernetes, libvirt hosts) ``net.bridge.bridge-nf-call-iptables``
is 1 and frames crossing a root-namespace bridge go through the host's iptables FORWARD
chain, whose policy Docker sets to DROP.  The per-bridge ``nf_call_iptables`` flag can only
add to the global sysctl, not override it, so the only fixes in the root namespace are
changing a global sysctl (racy between concurrent runs, weakens Docker's isolation) or
editing the host firewall.  Those sysctls are per network namespace, so a bridge in a
fresh namespace (empty ruleset) forwards whatever the host's firewall says, and the root
namespace gets only one veth with an address.  Nothing global is changed: no sysctl, no
firewall rule, no root-namespace qdisc.  rp_filter needs nothing either: every namespace
has a single interface, so the reverse path of any source is the interface it came in on.

Faults act on the veth pair between a host and the switch, per direction:
``"out"`` = traffic the host sends, ``"in"`` = traffic it receives, ``"both"`` (default).

- rate: tbf (or netem's ``rate``) on the sending end's egress.
- delay/jitter: netem on the sending end's egress.  Where the kernel has no sch_netem
  (e.g. the Firecracker CI kernel) a userspace delay line takes over: the switch
  namespace queues the port's IPv4 packets with iptables NFQUEUE and a small Python
  process (``_delay_line_main`` below) releases them after the delay.  There, ARP and
  IPv6 are not delayed, packets are never reordered, and the process costs CPU per
  packet (TCP through it: 4.5 Gbit/s at 1 ms each way, 0.9 Gbit/s at 10 ms, where
  TCP's window is the limit).  ``Network.delay_backend()`` says which one is in use.
- loss: a classic-BPF filter at the receiving end's ingress drops a random share of
  packets (silently, like a wire).  Segmentation offload is capped on the sending end
  while loss is on, so the loss applies to wire-sized packets, not 64 KiB GSO bursts.
- ``cut()``: the switch port goes down, so the host's eth0 loses carrier (``NO-CARRIER``):
  a pulled cable.  Addresses, routes and sockets survive; packets vanish silently in both
  directions; a TCP connection carries on after ``heal()`` if it has not timed out.
  (``ip link set eth0 down`` would instead delete the host's routes and fail its sends
  at once with ENETUNREACH, which a pulled cable does not do.)
- ``stall()``: the link stays up but every packet is dropped (a black hole, e.g. a hung
  switch); ``resume()`` lets traffic through again.  Independent of netem settings.

Every Network records its owner (pid and process start time) in its names and in
``/run/vmigrate-netns/<prefix>.json``; ``cleanup_stale()`` removes what crashed runs left.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import ipaddress
import itertools
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

__all__ = [
    "DEFAULT_PREFIX_ROOT",
    "DelayBackend",
    "Direction",
    "Host",
    "LinkFaults",
    "NetemUnavailable",
    "Network",
    "NetnsCommandError",
    "NetnsError",
    "NetnsUnavailable",
    "check_available",
    "cleanup_stale",
]

log = logging.getLogger(__name__)

Direction = Literal["both", "out", "in"]
DelayBackend = Literal["auto", "netem", "nfqueue"]

DEFAULT_PREFIX_ROOT = "vmt"
SUBNET_BASE = "10.231"  # Networks use 10.231.X.0/24, X picked free at start.
STATE_DIR = Path("/run/vmigrate-netns")
NETNS_DIR = Path("/run/netns")  # where `ip netns` keeps its namespaces
_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_IFNAMSIZ = 15
_HOST_DEV = "eth0"
_BRIDGE = "br0"
_UPLINK = "uplink"  # the uplink's end in the switch namespace
_QUEUE_LIMIT = 10_000  # packets held by netem / the delay line (netem's default is 1000)
_STALL_PREF = 10  # tc filter priorities at a receiving end's clsact ingress
_LOSS_PREF = 20
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,12}$")  # 13 chars: "p-" + name fits IFNAMSIZ

_seq = itertools.count()
_live: set[Network] = set()  # started, not yet closed: closed at exit if need be
_netem_supported: bool | None = None


class NetnsError(RuntimeError):
    """Base class of this module's errors."""


class NetnsUnavailable(NetnsError):
    """Network namespaces cannot be used here (not root, iproute2 missing, no permission)."""


class NetemUnavailable(NetnsError):
    """The requested fault cannot be emulated on this kernel / machine."""


class NetnsCommandError(NetnsError):
    """A command (ip, tc, iptables...) failed; the message is one line with its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = " | ".join(line.strip() for line in stderr.strip().splitlines()) or "no output"
        super().__init__(f"`{' '.join(argv)}` failed (exit {returncode}): {detail}")


@dataclass(frozen=True)
class LinkFaults:
    """What ``Host.netem()`` applied to the host's link (per direction in ``direction``)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_mbit: float | None = None
    direction: Direction = "both"


@dataclass(frozen=True)
class _End:
    """One end of a host's veth pair: a device in a namespace."""

    netns: str
    dev: str


# --------------------------------------------------------------------------- helpers


def check_available(path: str | None = None) -> None:
    """Raise NetnsUnavailable (one-line reason) unless namespaces can be built here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable(f"network namespaces need root (running as uid {os.geteuid()})")
    for tool in ("ip", "tc"):
        if _which(tool, path) is None:
            raise NetnsUnavailable(f"`{tool}` not found: install iproute2")


def _which(tool: str, path: str | None = None) -> str | None:
    if path is None:
        path = f"{os.environ.get('PATH', '')}:{_SEARCH_PATH}"
    return shutil.which(tool, path=path)


def _tool(tool: str) -> str:
    found = _which(tool)
    if found is None:
        raise NetnsUnavailable(f"`{tool}` not found")
    return found


def _cmd(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    """Run a control command; raise NetnsCommandError with its stderr if it fails."""
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetnsCommandError(argv, proc.returncode, proc.stderr or proc.stdout)
    return proc.stdout


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    ns = ["-n", netns] if netns else []
    return _cmd([_tool("ip"), *ns, *args], check=check)


def _ip_batch(lines: Sequence[str], netns: str | None = None) -> None:
    """Several `ip` commands in one process (aborts at the first failing line)."""
    ns = ["-n", netns] if netns else []
    _cmd([_tool("ip"), *ns, "-batch", "-"], input="\n".join(lines) + "\n")


def _tc(netns: str, *args: str, check: bool = True) -> str:
    return _cmd([_tool("tc"), "-n", netns, *args], check=check)


def _netns_exec(netns: str, argv: Sequence[str]) -> list[str]:
    return [_tool("ip"), "netns", "exec", netns, *argv]


def _iptables(netns: str, *args: str, check: bool = True) -> str:
    """iptables (mangle table) in a namespace; -w waits for the machine-wide xtables lock."""
    return _cmd(_netns_exec(netns, [_tool("iptables"), "-w", "-t", "mangle", *args]), check=check)


def _proc_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # zombie or dead: it owns nothing any more
        return None
    return int(fields[19])


def _owner_alive(pid: int, start_time: int | None) -> bool:
    actual = _proc_start_time(pid)
    return actual is not None and (start_time is None or actual == start_time)


def _netns_pids(netns: str) -> list[int]:
    """Pids of live processes in a named namespace (what `ip netns pids` does)."""
    try:
        st = os.stat(NETNS_DIR / netns)
    except FileNotFoundError:
        return []
    me = os.getpid()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            ns = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry.name))
    return pids


def _kill_netns_processes(namespaces: Sequence[str], grace_s: float = 1.0) -> None:
    """SIGTERM every process in the namespaces, SIGKILL what is left after grace_s.

    Exited processes leave the namespace at once (even as zombies), so there is no
    need to reap anything here; reaping with waitpid(-1) would steal other code's
    children.
    """
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 3.0)):
        pids = [pid for ns in namespaces for pid in _netns_pids(ns)]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not any(_netns_pids(ns) for ns in namespaces):
                return
            time.sleep(0.01)
    left = {ns: pids for ns in namespaces if (pids := _netns_pids(ns))}
    if left:
        raise NetnsError(f"processes survive SIGKILL in {left}")


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    """Serialise subnet allocation and cleanup between processes on this machine."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _used_ipv4_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix the root namespace routes or has an address in."""
    nets = []
    for route in json.loads(_ip("-4", "-j", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(dst, strict=False))
    for link in json.loads(_ip("-4", "-j", "addr", "show") or "[]"):
        for addr in link.get("addr_info", []):
            nets.append(ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    return nets


def _pick_subnet() -> ipaddress.IPv4Network:
    used = _used_ipv4_networks()
    start = random.randrange(256)  # spread concurrent runs; the lock makes it exact
    for i in range(256):
        candidate = ipaddress.IPv4Network(f"{SUBNET_BASE}.{(start + i) % 256}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetnsError(f"no free /24 left in {SUBNET_BASE}.0.0/16 in the root namespace")


def _prefix_pattern(prefix_root: str) -> re.Pattern[str]:
    """<root>-<owner pid>-<seq>[-<host>] for namespaces, the same without host for links."""
    return re.compile(rf"^({re.escape(prefix_root)}-(\d+)-[0-9a-z]+)(?:-[a-z0-9_]+)?$")


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _drop_bytecode(pct: float) -> str:
    """Classic BPF for `tc filter ... bpf da`: drop (TC_ACT_SHOT) pct % of packets.

    cls_bpf runs classic BPF too, and its ancillary load SKF_AD_RANDOM gives a fresh
    32-bit random number per packet, so this needs neither act_gact nor a compiler.
    """
    shot, unspec = 2, 0xFFFFFFFF  # TC_ACT_SHOT; TC_ACT_UNSPEC (-1): go on as if unfiltered
    if pct >= 100:
        insns = [(0x06, 0, 0, shot)]  # ret #SHOT
    else:
        threshold = min(round(pct / 100 * 2**32), 2**32 - 1)
        insns = [
            (0x20, 0, 0, 0xFFFFF000 + 56),  # ld [SKF_AD_OFF + SKF_AD_RANDOM]
            (0x35, 0, 1, threshold),  # jge #threshold, keep, drop
            (0x06, 0, 0, unspec),  # keep: ret #UNSPEC
            (0x06, 0, 0, shot),  # drop: ret #SHOT
        ]
    return f"{len(insns)}," + ",".join(f"{c} {jt} {jf} {k}" for c, jt, jf, k in insns)


def _probe_netem(netns: str) -> bool:
    """Can this kernel run sch_netem?  (Probed once, on the switch namespace's lo.)"""
    global _netem_supported
    if _netem_supported is None:
        try:
            _tc(netns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms")
        except NetnsCommandError as exc:
            if "unknown" not in exc.stderr.lower():
                raise
            _netem_supported = False
        else:
            _tc(netns, "qdisc", "del", "dev", "lo", "root")
            _netem_supported = True
    return _netem_supported


# --------------------------------------------------------------------------- Host


class Host:
    """One simulated machine: a network namespace with eth0 on the Network's LAN."""

    def __init__(self, network: Network, name: str, index: int, ip: str) -> None:
        self.network = network
        self.name = name
        self.netns = f"{network.prefix}-{name}"
        self.ip = ip
        self.index = index
        self.port = f"p-{name}"  # the switch-side end of the host's veth pair
        self._procs: list[subprocess.Popen[Any]] = []
        self._faults: LinkFaults | None = None
        self._cut = False
        self._stalled: set[_End] = set()  # receiving ends with the drop-all filter
        self._lossy: set[_End] = set()  # receiving ends with the loss filter
        self._clsact: set[_End] = set()
        self._shaped: set[_End] = set()  # sending ends with a root qdisc of ours
        self._gso_capped: dict[_End, int] = {}  # sending end -> original gso_max_segs
        self._delay_line: _DelayLine | None = None

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r}, ip={self.ip!r})"

    # ---- running commands

    def netns_argv(self, argv: Sequence[str]) -> list[str]:
        """argv prefixed so that it runs inside this host's namespace."""
        return _netns_exec(self.netns, argv)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen inside the namespace; killed at the latest by Network.close()."""
        proc = subprocess.Popen(self.netns_argv(argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside the namespace; check=True unless you say otherwise."""
        kwargs.setdefault("check", True)
        return subprocess.run(self.netns_argv(argv), **kwargs)

    # ---- faults

    @property
    def faults(self) -> LinkFaults | None:
        """What the last netem() applied (None: nothing)."""
        return self._faults

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def is_stalled(self) -> bool:
        return bool(self._stalled)

    def _host_end(self) -> _End:
        return _End(self.netns, _HOST_DEV)

    def _port_end(self) -> _End:
        return _End(self.network.switch_netns, self.port)

    def _ends(self, direction: Direction) -> list[tuple[_End, _End]]:
        """(sending end, receiving end) of the host's link for each direction asked."""
        if direction not in ("both", "out", "in"):
            raise ValueError(f"direction must be 'both', 'out' or 'in', not {direction!r}")
        pairs = []
        if direction in ("both", "out"):
            pairs.append((self._host_end(), self._port_end()))
        if direction in ("both", "in"):
            pairs.append((self._port_end(), self._host_end()))
        return pairs

    def netem(
        self,
        *,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        loss_pct: float = 0.0,
        rate_mbit: float | None = None,
        direction: Direction = "both",
    ) -> None:
        """Impair the host's link, replacing whatever netem() set before.

        Each value applies to each direction chosen: with direction="both",
        delay_ms=20 adds 40 ms to every round trip through this host's link, and
        loss_pct=10 drops 10 % of what the host sends and 10 % of what it receives.
        Leaves cut()/stall() alone.  Raises NetemUnavailable if the kernel cannot do it.
        """
        if delay_ms < 0 or jitter_ms < 0 or jitter_ms > delay_ms:
            raise ValueError("need 0 <= jitter_ms <= delay_ms")
        if not 0 <= loss_pct <= 100:
            raise ValueError("loss_pct must be within 0..100")
        if rate_mbit is not None and rate_mbit <= 0:
            raise ValueError("rate_mbit must be positive (or None for unlimited)")
        pairs = self._ends(direction)
        backend = self.network.delay_backend() if delay_ms else None
        self._clear_shaping()
        try:
            for send_end, recv_end in pairs:
                if delay_ms and backend == "netem":
                    self._add_netem_qdisc(send_end, delay_ms, jitter_ms, rate_mbit)
                elif rate_mbit:
                    self._add_tbf(send_end, rate_mbit)
                if loss_pct:
                    self._cap_gso(send_end)
                    self._add_drop_filter(recv_end, _LOSS_PREF, loss_pct)
                    self._lossy.add(recv_end)
            if delay_ms and backend == "nfqueue":
                dirs = {"out" if s == self._host_end() else "in" for s, _ in pairs}
                self._delay_line = _DelayLine.start(self, delay_ms, jitter_ms, dirs)
        except BaseException:
            self._clear_shaping()
            raise
        self._faults = LinkFaults(delay_ms, jitter_ms, loss_pct, rate_mbit, direction)

    def cut(self) -> None:
        """Pull the cable: the host's eth0 loses carrier; traffic vanishes both ways."""
        _ip("link", "set", "dev", self.port, "down", netns=self.network.switch_netns)
        self._cut = True

    def heal(self) -> None:
        """Plug the cable back in (undo cut()).

        The host also forgets the ARP entries that failed during the cut (losing the
        carrier had already flushed the good ones), so it re-resolves at once instead
        of after the neighbour retry timer (up to 1 s per entry).
        """
        _ip("link", "set", "dev", self.port, "up", netns=self.network.switch_netns)
        _ip("neigh", "flush", "dev", _HOST_DEV, netns=self.netns)
        self._cut = False

    def stall(self, direction: Direction = "both") -> None:
        """Black-hole the link (carrier stays up) until resume(); netem settings stay."""
        for _send_end, recv_end in self._ends(direction):
            if recv_end not in self._stalled:
                self._add_drop_filter(recv_end, _STALL_PREF, 100.0)
                self._stalled.add(recv_end)

    def resume(self) -> None:
        """Undo stall()."""
        for end in list(self._stalled):
            _tc(end.netns, "filter", "del", "dev", end.dev, "ingress", "pref", str(_STALL_PREF))
            self._stalled.discard(end)

    def clear_faults(self) -> None:
        """Remove everything netem(), stall() and cut() did."""
        errors = []
        for step in (self._clear_shaping, self.resume, self._heal_if_cut, self._drop_clsact):
            try:
                step()
            except NetnsError as exc:
                errors.append(str(exc))
        if errors:
            raise NetnsError(f"clear_faults on {self.name}: {'; '.join(errors)}")

    def _heal_if_cut(self) -> None:
        if self._cut:
            self.heal()

    def _clear_shaping(self) -> None:
        """Undo netem(): qdiscs, loss filters, GSO caps, delay line."""
        if self._delay_line is not None:
            line, self._delay_line = self._delay_line, None
            line.stop()
        for end in list(self._shaped):
            _tc(end.netns, "qdisc", "del", "dev", end.dev, "root")
            self._shaped.discard(end)
        for end in list(self._lossy):
            _tc(end.netns, "filter", "del", "dev", end.dev, "ingress", "pref", str(_LOSS_PREF))
            self._lossy.discard(end)
        for end, segs in list(self._gso_capped.items()):
            _ip("link", "set", "dev", end.dev, "gso_max_segs", str(segs), netns=end.netns)
            del self._gso_capped[end]
        self._faults = None

    def _drop_clsact(self) -> None:
        for end in list(self._clsact):
            _tc(end.netns, "qdisc", "del", "dev", end.dev, "clsact")
            self._clsact.discard(end)

    def _add_netem_qdisc(
        self, end: _End, delay_ms: float, jitter_ms: float, rate_mbit: float | None
    ) -> None:
        args = ["delay", f"{round(delay_ms * 1000)}us"]
        if jitter_ms:
            args.append(f"{round(jitter_ms * 1000)}us")
        if rate_mbit:
            args += ["rate", f"{round(rate_mbit * 1e6)}bit"]
        _tc(end.netns, *f"qdisc add dev {end.dev} root netem limit {_QUEUE_LIMIT}".split(), *args)
        self._shaped.add(end)

    def _add_tbf(self, end: _End, rate_mbit: float) -> None:
        rate_bytes = rate_mbit * 1e6 / 8
        burst = max(16 * 1024, round(rate_bytes / 250))  # >= a few MTUs, ~4 ms at speed
        limit = burst + round(rate_bytes / 10)  # ~100 ms of queue, then tail drop
        bits = round(rate_mbit * 1e6)
        _tc(
            end.netns,
            *f"qdisc add dev {end.dev} root tbf rate {bits}bit burst {burst}".split(),
            "limit",
            str(limit),
        )
        self._shaped.add(end)

    def _cap_gso(self, end: _End) -> None:
        """One wire packet per skb leaving this end, so loss hits packets, not GSO bursts."""
        if end in self._gso_capped:
            return
        info = json.loads(_ip("-d", "-j", "link", "show", "dev", end.dev, netns=end.netns))
        original = int(info[0].get("gso_max_segs", 65535))
        _ip("link", "set", "dev", end.dev, "gso_max_segs", "1", netns=end.netns)
        self._gso_capped[end] = original

    def _add_drop_filter(self, end: _End, pref: int, pct: float) -> None:
        if end not in self._clsact:
            _tc(end.netns, "qdisc", "add", "dev", end.dev, "clsact")
            self._clsact.add(end)
        try:
            filter_ = f"filter add dev {end.dev} ingress pref {pref} handle 1 bpf da bytecode"
            _tc(end.netns, *filter_.split(), _drop_bytecode(pct))
        except NetnsCommandError as exc:
            raise NetemUnavailable(f"cannot drop packets with tc cls_bpf: {exc}") from exc


# --------------------------------------------------------------------------- delay line


class _DelayLine:
    """Userspace stand-in for netem delay: NFQUEUE in the switch namespace + a Python
    process that accepts each queued packet after the delay (see _delay_line_main)."""

    def __init__(self, host: Host, proc: subprocess.Popen[str], rules: list[list[str]]) -> None:
        self.host = host
        self.proc = proc
        self.rules = rules

    @classmethod
    def start(
        cls, host: Host, delay_ms: float, jitter_ms: float, directions: set[str]
    ) -> _DelayLine:
        net = host.network
        queue = str(host.index)
        script = str(Path(__file__).resolve())
        argv = [sys.executable, script, "delay-line", queue, str(delay_ms), str(jitter_ms)]
        proc = subprocess.Popen(
            _netns_exec(net.switch_netns, argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready, _, _ = select.select([proc.stdout], [], [], 10.0)
        line = proc.stdout.readline() if ready and proc.stdout else ""
        if line.strip() != "ready":
            proc.kill()
            _, err = proc.communicate()
            raise NetemUnavailable(f"delay line did not start: {' | '.join(err.splitlines()[-3:])}")
        assert proc.stdout is not None
        proc.stdout.close()
        rules = []
        if "out" in directions:  # what the host sends, as it enters the switch
            rules.append(["PREROUTING", "-m", "physdev", "--physdev-in", host.port])
        if "in" in directions:  # what the host receives, as it leaves the switch
            rules.append(["POSTROUTING", "-m", "physdev", "--physdev-out", host.port])
        delay_line = cls(host, proc, [])
        try:
            for rule in rules:
                rule += ["-j", "NFQUEUE", "--queue-num", queue]
                _iptables(net.switch_netns, "-A", *rule)
                delay_line.rules.append(rule)
        except BaseException:
            delay_line.stop()
            raise
        return delay_line

    def stop(self) -> None:
        sw = self.host.network.switch_netns
        for rule in self.rules:  # first stop queueing: a queue without reader drops
            _iptables(sw, "-D", *rule, check=False)
        self.rules = []
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if self.proc.returncode not in (0, -signal.SIGTERM):
            log.warning(
                "delay line of %s exited with %s: %s",
                self.host.name,
                self.proc.returncode,
                err.strip(),
            )


def _delay_line_main(queue: int, delay_ms: float, jitter_ms: float) -> None:
    """Hold every packet of NFQUEUE `queue` for delay_ms (+- jitter_ms, order kept).

    Speaks nfnetlink_queue directly (no libnetfilter_queue): copy mode META (no
    payload), GSO packets unsegmented, and releases with batch verdicts, which accept
    every queued packet up to an id, so a lost notification never strands a packet.
    """
    nlm_f_request, nlm_f_ack = 1, 4
    subsys_queue = 3 << 8
    msg_packet, msg_config, msg_verdict_batch = subsys_queue | 0, subsys_queue | 2, subsys_queue | 3

    def nlmsg(mtype: int, flags: int, payload: bytes) -> bytes:
        return struct.pack("=IHHII", 16 + len(payload), mtype, flags, 0, 0) + payload

    def attr(kind: int, data: bytes) -> bytes:
        length = 4 + len(data)
        return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)

    header = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue)  # nfgenmsg
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    sock.bind((0, 0))
    sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
    sock.setsockopt(270, 5, 1)  # SOL_NETLINK, NETLINK_NO_ENOBUFS

    def configure(payload: bytes) -> None:
        sock.send(nlmsg(msg_config, nlm_f_request | nlm_f_ack, header + payload))
        reply = sock.recv(65536)
        if struct.unpack_from("=H", reply, 4)[0] == 2:  # NLMSG_ERROR
            err = struct.unpack_from("=i", reply, 16)[0]
            if err:
                raise OSError(-err, f"nfqueue config: {os.strerror(-err)}")

    configure(attr(1, struct.pack("!BBH", 1, 0, socket.AF_INET)))  # CFG_CMD BIND
    configure(
        attr(2, struct.pack("!IB", 0, 1))  # CFG_PARAMS: copy META
        + attr(3, struct.pack("!I", _QUEUE_LIMIT))  # CFG_QUEUE_MAXLEN
        + attr(5, struct.pack("!I", 4))  # CFG_FLAGS: F_GSO
        + attr(4, struct.pack("!I", 4))  # CFG_MASK
    )
    print("ready", flush=True)

    delay, jitter = delay_ms / 1000, jitter_ms / 1000
    pending: collections.deque[tuple[float, int]] = collections.deque()
    last_due = 0.0
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        readable, _, _ = select.select([sock], [], [], timeout)
        if readable:
            while True:
                try:
                    data = sock.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                now = time.monotonic()
                off = 0
                while off + 16 <= len(data):
                    length, mtype = struct.unpack_from("=IH", data, off)
                    if mtype == msg_packet:
                        pos = off + 20  # nlmsghdr + nfgenmsg
                        while pos + 4 <= off + length:
                            alen, akind = struct.unpack_from("=HH", data, pos)
                            if akind & 0x7FFF == 1:  # NFQA_PACKET_HDR: packet_id first
                                due = now + delay + random.uniform(-jitter, jitter)
                                last_due = max(due, last_due)
                                pending.append(
                                    (last_due, struct.unpack_from("!I", data, pos + 4)[0])
                                )
                                break
                            pos += (alen + 3) & ~3
                    off += (max(length, 16) + 3) & ~3
        now = time.monotonic()
        release = None
        while pending and pending[0][0] <= now:
            release = pending.popleft()[1]
        if release is not None:
            verdict = attr(2, struct.pack("!II", 1, release))  # NFQA_VERDICT_HDR: NF_ACCEPT
            sock.send(nlmsg(msg_verdict_batch, nlm_f_request, header + verdict))


# --------------------------------------------------------------------------- Network


class Network:
    """A LAN of namespaces (see the module docstring).  Use as a context manager.

    ``prefix_root`` (<= 4 chars) starts every name this Network creates; the full
    prefix adds the owner pid and a sequence number, e.g. ``vmt-4242-0``.
    ``delay_backend``: "netem", "nfqueue" (userspace delay line) or "auto" (netem
    if the kernel has it).  ``reap_stale`` runs cleanup_stale(prefix_root) at start.
    """

    def __init__(
        self,
        prefix_root: str = DEFAULT_PREFIX_ROOT,
        *,
        delay_backend: DelayBackend = "auto",
        reap_stale: bool = True,
    ) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,3}", prefix_root):
            raise ValueError(f"prefix_root must be 1-4 of [a-z0-9], not {prefix_root!r}")
        if delay_backend not in ("auto", "netem", "nfqueue"):
            raise ValueError(f"unknown delay_backend {delay_backend!r}")
        self.prefix_root = prefix_root
        self.prefix = f"{prefix_root}-{os.getpid()}-{_base36(next(_seq))}"
        if len(self.prefix) > _IFNAMSIZ:
            raise ValueError(f"prefix {self.prefix!r} longer than {_IFNAMSIZ} characters")
        self.switch_netns = self.prefix
        self.uplink = self.prefix  # the root namespace's interface
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway = ""  # the root namespace's address, hosts' default route
        self.hosts: dict[str, Host] = {}
        self._delay_backend = delay_backend
        self._resolved_backend: Literal["netem", "nfqueue"] | None = None
        self._reap_stale = reap_stale
        self._namespaces: list[str] = []
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"Network({self.prefix!r}, subnet={self.subnet}, hosts={list(self.hosts)})"

    def __enter__(self) -> Network:
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except NetnsError as cleanup_error:  # don't hide the test's own failure
            log.warning("teardown of %s failed: %s", self.prefix, cleanup_error)

    @property
    def state_file(self) -> Path:
        return STATE_DIR / f"{self.prefix}.json"

    def start(self) -> None:
        """Create the switch namespace, its bridge and the root namespace's uplink."""
        if self._started:
            raise NetnsError(f"{self.prefix} already started")
        check_available()
        self._started = True
        if self._reap_stale:
            try:
                cleanup_stale(self.prefix_root)
            except NetnsError as exc:  # someone else's mess must not stop this run
                log.warning("cleanup of stale networks failed: %s", exc)
        _live.add(self)
        try:
            with _state_lock():
                self.subnet = _pick_subnet()
                hosts = self.subnet.hosts()
                self.gateway = str(next(hosts))
                self.state_file.write_text(
                    json.dumps(
                        {
                            "owner_pid": os.getpid(),
                            "owner_start_time": _proc_start_time(os.getpid()),
                            "subnet": str(self.subnet),
                            "created": time.time(),
                        }
                    )
                )
                self._add_netns(self.switch_netns, first=True)
                _ip_batch(
                    [
                        f"link add name {_BRIDGE} type bridge stp_state 0 forward_delay 0",
                        f"link set dev {_BRIDGE} up",
                    ],
                    netns=self.switch_netns,
                )
                _ip_batch(
                    [
                        f"link add name {self.uplink} type veth peer name {_UPLINK}"
                        f" netns {self.switch_netns}",
                        f"addr add {self.gateway}/{self.subnet.prefixlen} dev {self.uplink}",
                        f"link set dev {self.uplink} up",
                    ]
                )
                _ip_batch(
                    [
                        f"link set dev {_UPLINK} master {_BRIDGE}",
                        f"link set dev {_UPLINK} up",
                    ],
                    netns=self.switch_netns,
                )
        except BaseException:
            self.close()
            raise

    def _add_netns(self, name: str, first: bool = False) -> None:
        try:
            _ip("netns", "add", name)
        except NetnsCommandError as exc:
            if first:  # the first namespace doubles as the capability probe
                raise NetnsUnavailable(f"cannot create network namespaces: {exc}") from exc
            raise
        self._namespaces.append(name)

    def add_host(self, name: str) -> Host:
        """Create namespace <prefix>-<name> with eth0 on the LAN, lo up, default route."""
        if not self._started or self._closed:
            raise NetnsError("add_host() needs a started, open Network")
        if not _NAME_RE.match(name):
            raise ValueError(f"host name must match {_NAME_RE.pattern}, not {name!r}")
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists already")
        assert self.subnet is not None
        index = len(self.hosts) + 1
        if index + 1 >= self.subnet.num_addresses - 1:
            raise NetnsError(f"no address left in {self.subnet}")
        host = Host(self, name, index, str(self.subnet.network_address + index + 1))
        self._add_netns(host.netns)
        _ip_batch(
            [
                f"link add name {host.port} type veth peer name {_HOST_DEV} netns {host.netns}",
                f"link set dev {host.port} master {_BRIDGE}",
                f"link set dev {host.port} up",
            ],
            netns=self.switch_netns,
        )
        _ip_batch(
            [
                "link set dev lo up",
                f"addr add {host.ip}/{self.subnet.prefixlen} dev {_HOST_DEV}",
                f"link set dev {_HOST_DEV} up",
                f"route add default via {self.gateway}",
            ],
            netns=host.netns,
        )
        self.hosts[name] = host
        return host

    def delay_backend(self) -> Literal["netem", "nfqueue"]:
        """How delay is emulated here; raises NetemUnavailable when it cannot be."""
        if self._resolved_backend is None:
            self._resolved_backend = self._resolve_delay_backend()
        return self._resolved_backend

    def _resolve_delay_backend(self) -> Literal["netem", "nfqueue"]:
        wanted = self._delay_backend
        if wanted in ("auto", "netem") and _probe_netem(self.switch_netns):
            return "netem"
        if wanted == "netem":
            raise NetemUnavailable("this kernel has no sch_netem (CONFIG_NET_SCH_NETEM)")
        missing = []
        if _which("iptables") is None:
            missing.append("iptables (apt-get install iptables)")
        if not Path("/proc/sys/net/bridge").is_dir():
            missing.append("br_netfilter (not loaded; loading it changes the host's bridges)")
        if missing:
            why = "no sch_netem in this kernel" if wanted == "auto" else "asked for nfqueue"
            raise NetemUnavailable(
                f"cannot emulate delay: {why}, and the nfqueue fallback needs {', '.join(missing)}"
            )
        # Bridged IPv4 must go through the switch namespace's iptables to reach NFQUEUE.
        _ip(
            *f"link set dev {_BRIDGE} type bridge nf_call_iptables 1".split(),
            netns=self.switch_netns,
        )
        return "nfqueue"

    def close(self) -> None:
        """Kill processes in our namespaces, delete uplink and namespaces.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        errors: list[str] = []
        namespaces = [ns for ns in self._namespaces if (NETNS_DIR / ns).exists()]
        try:
            _kill_netns_processes(namespaces)
        except NetnsError as exc:
            errors.append(str(exc))
        for host in self.hosts.values():  # reap our children (all killed by now)
            procs = list(host._procs)
            if host._delay_line is not None:
                procs.append(host._delay_line.proc)
                host._delay_line = None
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1)
        # The uplink first, synchronously: namespaces are freed asynchronously by the
        # kernel, and the root end of a veth would linger until its peer's one is.
        if Path(f"/sys/class/net/{self.uplink}").exists():
            try:
                _ip("link", "del", "dev", self.uplink)
            except NetnsError as exc:
                errors.append(str(exc))
        for ns in reversed(namespaces):
            try:
                _ip("netns", "del", ns)
            except NetnsError as exc:
                errors.append(str(exc))
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        if errors:
            raise NetnsError(f"teardown of {self.prefix} incomplete: {'; '.join(errors)}")


def cleanup_stale(prefix_root: str = DEFAULT_PREFIX_ROOT) -> list[str]:
    """Remove namespaces, root links and state files of Networks whose owner is dead.

    The owner is the pid in the names; its start time in the state file tells a dead
    owner from a new process that got the same pid.  Returns what was removed, as
    "netns <name>", "link <name>" and "state <path>".
    """
    check_available()
    pattern = _prefix_pattern(prefix_root)
    live = {net.prefix for net in _live}
    removed: list[str] = []
    with _state_lock():
        namespaces = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
        links = [link["ifname"] for link in json.loads(_ip("-j", "link", "show") or "[]")]
        states = [p.stem for p in STATE_DIR.glob("*.json")]
        owners: dict[str, int] = {}
        for name in [*namespaces, *links, *states]:
            m = pattern.match(name)
            if m:
                owners[m.group(1)] = int(m.group(2))
        for prefix, pid in owners.items():
            state_path = STATE_DIR / f"{prefix}.json"
            start_time = None
            with contextlib.suppress(OSError, ValueError):
                start_time = json.loads(state_path.read_text()).get("owner_start_time")
            if prefix in live or _owner_alive(pid, start_time):
                continue
            mine = [ns for ns in namespaces if (m := pattern.match(ns)) and m.group(1) == prefix]
            try:
                _kill_netns_processes(mine, grace_s=0.2)
            except NetnsError as exc:
                log.warning("%s", exc)
            if prefix in links:
                _ip("link", "del", "dev", prefix, check=False)
                removed.append(f"link {prefix}")
            for ns in mine:
                _ip("netns", "del", ns, check=False)
                removed.append(f"netns {ns}")
            with contextlib.suppress(FileNotFoundError):
                state_path.unlink()
                removed.append(f"state {state_path}")
    if removed:
        log.info("removed leftovers of dead runs: %s", ", ".join(removed))
    return removed


@atexit.register
def _close_live_networks() -> None:
    """Last resort for Networks nobody closed (a crash via SIGKILL leaves cleanup_stale)."""
    for net in list(_live):
        with contextlib.suppress(Exception):
            net.close()


if __name__ == "__main__" and sys.argv[1:2] == ["delay-line"]:
    _delay_line_main(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
