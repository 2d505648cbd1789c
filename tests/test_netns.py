"""Tests of the network-namespace harness (tests/netns.py), on real namespaces.

Timing-based assertions use wide bands: they check that a fault has the effect asked
for, not the kernel's precision.  Measured values are printed (see them with -s).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import (
    DelayBackend,
    Host,
    NetemUnavailable,
    NetnsUnavailable,
    Network,
    check_available,
    cleanup_stale,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

PORT = 5201

# Receives connections one after the other; for each prints "<bytes> <sha256> <seconds
# from first byte to EOF>".
SERVER = r"""
import hashlib, socket, sys, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(16)
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        digest, size, first = hashlib.sha256(), 0, None
        while chunk := conn.recv(1 << 20):
            first = first or time.monotonic()
            digest.update(chunk)
            size += len(chunk)
        took = time.monotonic() - first if first else 0.0
        print(size, digest.hexdigest(), f"{took:.6f}", flush=True)
"""

# Sends <size> bytes of payload(); exits 3 if it cannot connect within <timeout>.  With
# "pause", sends half, prints "half" and waits for a line on stdin before the rest.
CLIENT = r"""
import socket, sys
ip, port, size, timeout, mode = sys.argv[1:]
port, size, timeout = int(port), int(size), float(timeout)
try:
    s = socket.create_connection((ip, port), timeout=timeout)
except OSError as exc:
    print(type(exc).__name__, exc, flush=True)
    sys.exit(3)
s.settimeout(60)
data = (bytes(range(256)) * (size // 256 + 1))[:size]
if mode == "pause":
    s.sendall(data[: size // 2])
    print("half", flush=True)
    sys.stdin.readline()
    data = data[size // 2 :]
s.sendall(data)
s.shutdown(socket.SHUT_WR)
s.recv(1)
"""


def payload(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def readline(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output within {timeout} s")
    return proc.stdout.readline().strip()


def start_server(host: Host) -> subprocess.Popen:
    server = host.popen(
        [sys.executable, "-c", SERVER, str(PORT)], stdout=subprocess.PIPE, text=True
    )
    assert readline(server, 10) == "listening"
    return server


def client_argv(ip: str, size: int, timeout: float = 2.0, mode: str = "plain") -> list[str]:
    return [sys.executable, "-c", CLIENT, ip, str(PORT), str(size), str(timeout), mode]


def send(host: Host, ip: str, size: int, timeout: float = 2.0) -> int:
    """Send size bytes from host to ip:PORT; the client's exit code (3: no connection)."""
    return host.run(client_argv(ip, size, timeout), check=False, capture_output=True).returncode


def received(server: subprocess.Popen, timeout: float = 30) -> tuple[int, str, float]:
    size, digest, took = readline(server, timeout).split()
    return int(size), digest, float(took)


def ping_rtts(host: Host | None, ip: str, count: int = 10) -> list[float]:
    """RTTs in ms of `count` pings (from the root namespace if host is None)."""
    argv = ["ping", "-n", "-c", str(count), "-i", "0.05", "-W", "1", ip]
    if host is not None:
        argv = host.netns_argv(argv)
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", proc.stdout)]


def ping_loss_pct(host: Host, ip: str, count: int) -> float:
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.002", "-W", "0.3", ip]
    out = host.run(argv, check=False, capture_output=True, text=True).stdout
    m = re.search(r"([\d.]+)% packet loss", out)
    assert m, out
    return float(m.group(1))


def make_network(delay_backend: DelayBackend = "auto") -> Network:
    """A started Network, or a skip with the one-line reason it cannot be made here."""
    if shutil.which("ping") is None:
        pytest.skip("ping not installed (apt-get install iputils-ping)")
    net = Network(delay_backend=delay_backend)
    try:
        net.start()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    return net


@pytest.fixture
def net() -> Iterator[Network]:
    network = make_network()
    yield network
    network.close()


@pytest.fixture
def pair(net: Network) -> tuple[Host, Host]:
    return net.add_host("a"), net.add_host("b")


def netem_or_skip(host: Host, **kwargs: object) -> None:
    try:
        host.netem(**kwargs)  # type: ignore[arg-type]
    except NetemUnavailable as exc:
        pytest.skip(str(exc))


# --------------------------------------------------------------------------- errors


def test_missing_ip_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NetnsUnavailable, match=r"`ip` not found"):
        check_available(path=str(tmp_path))


def test_not_root_is_a_clear_error() -> None:
    if os.geteuid() != 0:
        with pytest.raises(NetnsUnavailable, match="need root"):
            Network().start()
        return
    os.seteuid(65534)  # really drop root for a moment, no mock
    try:
        with pytest.raises(NetnsUnavailable, match=r"need root \(running as uid 65534\)"):
            Network().start()
    finally:
        os.seteuid(0)


# --------------------------------------------------------------------------- basics


def test_hosts_reach_each_other_and_the_root_namespace(net: Network, pair: tuple[Host, Host]):
    a, b = pair
    assert a.netns == f"{net.prefix}-a" and a.name == "a"
    assert a.ip != b.ip and net.subnet is not None
    assert {a.ip, b.ip, net.gateway} <= {str(ip) for ip in net.subnet.hosts()}
    assert ping_rtts(a, b.ip, 2) and ping_rtts(b, a.ip, 2)
    assert ping_rtts(a, net.gateway, 2)  # host -> root namespace
    assert ping_rtts(None, a.ip, 2) and ping_rtts(None, b.ip, 2)  # root namespace -> hosts
    routes = a.run(["ip", "route"], capture_output=True, text=True).stdout
    assert f"default via {net.gateway} dev eth0" in routes
    links = a.run(["ip", "-j", "link"], capture_output=True, text=True).stdout
    assert {link["ifname"]: "UP" in link["flags"] for link in json.loads(links)} == {
        "lo": True,
        "eth0": True,
    }


def test_tcp_transfer_between_hosts_and_from_root(pair: tuple[Host, Host]) -> None:
    a, b = pair
    server = start_server(b)
    size = 8 << 20
    assert send(a, b.ip, size) == 0
    got, digest, took = received(server)
    assert (got, digest) == (size, hashlib.sha256(payload(size)).hexdigest())
    print(f"unshaped a->b: {size * 8 / took / 1e6:.0f} Mbit/s")
    root_client = subprocess.run(client_argv(b.ip, 1000), check=False, capture_output=True)
    assert root_client.returncode == 0  # the CLI, in the root namespace, reaches hosts
    assert received(server)[0] == 1000


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("backend", ["netem", "nfqueue"])
def test_delay_adds_round_trip_time(backend: DelayBackend) -> None:
    with make_network(backend) as net:
        check_delay(net, net.add_host("a"), net.add_host("b"))


def check_delay(net: Network, a: Host, b: Host) -> None:
    base = ping_rtts(a, b.ip)
    netem_or_skip(a, delay_ms=20)  # 20 ms each way on a's link
    both = ping_rtts(a, b.ip)
    a.netem(delay_ms=20, direction="out")  # only what a sends
    out = ping_rtts(a, b.ip)
    a.netem(delay_ms=20, jitter_ms=5)
    jittered = ping_rtts(a, b.ip, 20)
    a.clear_faults()
    after = ping_rtts(a, b.ip)
    backend = net.delay_backend()
    print(
        f"[{backend}] RTT ms: base avg {sum(base) / len(base):.3f}, 2x20 ms "
        f"{min(both):.2f}..{max(both):.2f}, 1x20 ms {min(out):.2f}..{max(out):.2f}, "
        f"2x(20+-5) {min(jittered):.2f}..{max(jittered):.2f}"
    )
    assert len(base) == len(both) == len(out) == 10
    assert max(base) < 5
    assert min(both) >= 40 and sum(both) / len(both) < 40 + 10
    assert min(out) >= 20 and sum(out) / len(out) < 20 + 10
    assert min(jittered) >= 30 and max(jittered) < 50 + 10
    assert max(jittered) - min(jittered) > 2
    assert max(after) < 5 and a.faults is None


def test_total_loss_and_cut_break_connections_until_cleared(pair: tuple[Host, Host]) -> None:
    a, b = pair
    start_server(b)
    assert send(a, b.ip, 1000) == 0

    a.netem(loss_pct=100)
    assert send(a, b.ip, 1000, timeout=0.5) == 3
    a.clear_faults()
    assert send(a, b.ip, 1000) == 0

    a.cut()
    carrier = a.run(["ip", "-j", "link", "show", "eth0"], capture_output=True, text=True)
    assert "NO-CARRIER" in json.loads(carrier.stdout)[0]["flags"]  # a pulled cable
    assert send(a, b.ip, 1000, timeout=0.5) == 3
    assert send(b, a.ip, 1000, timeout=0.5) == 3
    a.heal()
    assert send(a, b.ip, 1000) == 0

    b.stall(direction="in")  # b's incoming traffic is black-holed, its link stays up
    assert send(a, b.ip, 1000, timeout=0.5) == 3
    link = b.run(["ip", "link", "show", "eth0"], capture_output=True, text=True).stdout
    assert "NO-CARRIER" not in link
    b.resume()
    assert send(a, b.ip, 1000) == 0


def test_established_connection_survives_a_short_cut(pair: tuple[Host, Host]) -> None:
    a, b = pair
    server = start_server(b)
    size = 1 << 20
    client = a.popen(
        client_argv(b.ip, size, mode="pause"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert readline(client, 10) == "half"
    a.cut()
    assert client.stdin is not None
    client.stdin.write("go\n")
    client.stdin.flush()
    time.sleep(0.5)  # the second half is retransmitted into the void meanwhile
    a.heal()
    got, digest, _ = received(server, timeout=20)
    assert (got, digest) == (size, hashlib.sha256(payload(size)).hexdigest())
    assert client.wait(10) == 0


def test_partial_loss(pair: tuple[Host, Host]) -> None:
    a, b = pair
    assert ping_rtts(a, b.ip, 1)  # resolve ARP first: a lost ARP costs a whole second
    a.netem(loss_pct=20)  # each way: a ping round trip survives with p = 0.8 ** 2
    loss = ping_loss_pct(a, b.ip, 300)
    print(f"20 % each way: {loss:.1f} % of pings lost (expected 36 %)")
    assert 20 <= loss <= 52
    a.clear_faults()
    assert ping_loss_pct(a, b.ip, 50) == 0


def test_bulk_transfer_through_loss_arrives_intact(pair: tuple[Host, Host]) -> None:
    a, b = pair
    server = start_server(b)
    a.netem(loss_pct=2)  # both ways: data segments and ACKs
    size = 2 << 20
    assert send(a, b.ip, size) == 0
    got, digest, took = received(server)
    assert (got, digest) == (size, hashlib.sha256(payload(size)).hexdigest())
    print(f"2 % loss each way: {size * 8 / took / 1e6:.0f} Mbit/s")


def test_rate_limit_slows_a_bulk_transfer(pair: tuple[Host, Host]) -> None:
    a, b = pair
    server = start_server(b)
    size = 2 << 20
    assert send(a, b.ip, size) == 0
    fast = size * 8 / received(server)[2] / 1e6
    a.netem(rate_mbit=16)
    assert send(a, b.ip, size, timeout=5) == 0
    slow = size * 8 / received(server)[2] / 1e6
    a.netem(rate_mbit=16, direction="in")  # a receives slowly, sends freely
    assert send(a, b.ip, size) == 0
    other_way = size * 8 / received(server)[2] / 1e6
    print(
        f"throughput: unshaped {fast:.0f} Mbit/s, 16 Mbit/s limit {slow:.1f} Mbit/s, "
        f"limit on the other direction {other_way:.0f} Mbit/s"
    )
    assert 16 * 0.6 <= slow <= 16 * 1.15
    assert fast > 5 * 16 and other_way > 5 * 16


# --------------------------------------------------------------------------- lifecycle


def _names() -> tuple[set[str], set[str]]:
    """Namespaces and root-namespace links, as `ip` lists them."""
    netns_list = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    link_list = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True).stdout
    namespaces = {line.split()[0] for line in netns_list.splitlines()}
    return namespaces, {link["ifname"] for link in json.loads(link_list)}


def test_teardown_leaves_nothing_behind() -> None:
    net = make_network()
    a, b = net.add_host("a"), net.add_host("b")
    sleeper = a.popen(["sleep", "600"])
    stray = subprocess.Popen(b.netns_argv(["sleep", "600"]))  # not started by popen()
    a.netem(delay_ms=5, loss_pct=1, rate_mbit=100) if _can_delay(net) else a.netem(loss_pct=1)
    b.stall()
    b.cut()
    namespaces, links = _names()
    assert {net.switch_netns, a.netns, b.netns} <= namespaces and net.uplink in links
    net.close()
    namespaces, links = _names()
    assert not {ns for ns in namespaces if ns.startswith(net.prefix)}
    assert net.uplink not in links
    assert not net.state_file.exists()
    assert sleeper.poll() is not None
    assert stray.wait(5) == -signal.SIGTERM
    net.close()  # idempotent


def _can_delay(net: Network) -> bool:
    try:
        net.delay_backend()
    except NetemUnavailable:
        return False
    return True


def test_two_networks_at_once_do_not_collide() -> None:
    with make_network() as one, make_network() as two:
        hosts = [(net, net.add_host("a"), net.add_host("b")) for net in (one, two)]
        assert one.prefix != two.prefix and one.uplink != two.uplink
        assert one.subnet is not None and two.subnet is not None
        assert not one.subnet.overlaps(two.subnet)
        for net, a, b in hosts:
            assert ping_rtts(a, b.ip, 2) and ping_rtts(a, net.gateway, 2)
        hosts[0][1].cut()  # faults stay in their own network
        assert ping_rtts(hosts[1][1], hosts[1][2].ip, 2)
    namespaces, links = _names()
    assert not {n for n in namespaces | links if n.startswith((one.prefix, two.prefix))}


CRASHER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import netns
net = netns.Network("vmtz")
net.start()
host = net.add_host("a")
sleeper = host.popen(["sleep", "600"])
host.netem(rate_mbit=10)
print(net.prefix, sleeper.pid, flush=True)
time.sleep(600)
"""


def test_cleanup_stale_removes_leftovers_of_a_killed_process() -> None:
    make_network().close()  # skips where namespaces cannot be made
    crasher = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        prefix, sleeper_pid = readline(crasher, 20).split()
    finally:
        crasher.kill()
        crasher.wait()
    namespaces, links = _names()
    assert {prefix, f"{prefix}-a"} <= namespaces and prefix in links
    assert not [name for name in cleanup_stale("vmt") if prefix in name]  # other root
    assert {prefix, f"{prefix}-a"} <= _names()[0]
    cleanup_stale("vmtz")  # (a concurrent run may have beaten us to it: check the result)
    namespaces, links = _names()
    assert not {n for n in namespaces | links if n.startswith(prefix)}
    assert not Path(f"/run/vmigrate-netns/{prefix}.json").exists()
    assert not alive(int(sleeper_pid))


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"
