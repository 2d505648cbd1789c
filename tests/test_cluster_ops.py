"""Cluster operations on three hosts that are network namespaces: drain and
undrain, a guest that cannot move, rolling upgrades that switch agents between
this version and the previous release, the same-host live update of a guest,
and how a restarted agent settles an interrupted same-host update.

Everything is real: KVM guests in VMM processes, agents in namespaces with
mutual TLS, the CLI as a user runs it. After each operation the cluster store
is checked against what really runs: the VMM processes under each host's
state directory, asked for their guest and state.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster import ClusterBase, NetnsCluster, guest_starter
from tests.test_cli import _fails
from vmigrate.migrate.drain import Placement
from vmigrate.migrate.store import open_store
from vmigrate.migrate.vms import STATE_NAMES
from vmigrate.proto import vmm_pb2
from vmigrate.vmm.client import VmmClient, VmmError, pid_alive, read_pid

pytestmark = pytest.mark.netns
MIB = 1 << 20


# ---------------------------------------------------------------- what really runs


def vmm_processes(home: Path) -> set[int]:
    """Pids of every VMM process started for this cluster (by command line)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vmigrate.vmm" in argv and any(str(home).encode() in a for a in argv) \
                and pid_alive(int(entry)):
            pids.add(int(entry))
    return pids


def reality(home: Path) -> dict[str, list[tuple[str, str, int]]]:
    """Guest name -> [(host, state, pid)] for every live VMM with a guest
    under the cluster's host directories, each asked over its own socket."""
    out: dict[str, list[tuple[str, str, int]]] = {}
    for vm_dir in sorted((home / "cluster" / "hosts").glob("*/vms/*")):
        pid = read_pid(vm_dir)
        if not pid or not pid_alive(pid):
            continue
        host = vm_dir.parent.parent.name
        client = VmmClient(vm_dir)
        try:
            st = client.status(timeout=5)
            if st.state == vmm_pb2.VmmStatus.STANDBY:
                continue
            name, state = st.config.name, STATE_NAMES.get(st.state, str(st.state))
        except VmmError:
            name, state = vm_dir.name, "mute"
        finally:
            client.close()
        out.setdefault(name, []).append((host, state, pid))
    return out


def check_store_against_reality(home: Path, store_url: str,
                                strict: bool = True) -> dict[str, list[tuple[str, str, int]]]:
    """Every guest in the store runs in exactly one VMM, on its owner; no VMM
    runs a guest the store does not know; no VMM process is unaccounted for.
    strict=False tolerates a not-running leftover (a half-arrived copy)."""
    with open_store(store_url) as st:
        owners = {v.name: v.owner for v in st.list_vms()}
        hosts = {h.name for h in st.list_hosts()}
    real = reality(home)
    for name, owner in owners.items():
        assert owner in hosts, f"{name} is owned by {owner}, which is not registered"
        running = [(h, s) for h, s, _ in real.get(name, []) if s in ("running", "paused")]
        assert len(running) == 1, f"{name} (owner {owner}) runs in {running or 'no VMM'}"
        assert running[0][0] == owner, f"{name} is owned by {owner} but runs on {running[0][0]}"
        if strict:
            assert len(real[name]) == 1, f"{name} has several VMMs: {real[name]}"
    unknown = set(real) - set(owners)
    assert not unknown, f"VMMs run guests the store does not know: {unknown}"
    stray = _stray_vmms(home)
    if stray:       # a spare VMM being started has no pid file yet: look again
        time.sleep(2)
        stray &= _stray_vmms(home)
    assert not stray, f"VMM processes outside any guest's directory: {stray}"
    return real


def _stray_vmms(home: Path) -> set[int]:
    known = {read_pid(d) for d in (home / "cluster" / "hosts").glob("*/vms/*")}
    return vmm_processes(home) - known


def memfd_inode(pid: int, name: str) -> int:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with_target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if with_target.startswith(f"/memfd:vmigrate:{name} "):
            return os.stat(f"/proc/{pid}/fd/{fd}").st_ino
    raise AssertionError(f"pid {pid} has no memfd of {name}")


def continues(c: ClusterBase, name: str, before: int) -> None:
    """The guest kept counting, its self-check is clean, its history is whole."""
    r = c.wait_heartbeats(name, 3, after=before, timeout=60)
    assert r.clean(), (name, r.problems, r.gaps())
    assert r.heartbeats[0][0].n <= before, f"{name}: console history was lost"


def last_n(c: ClusterBase, name: str) -> int:
    return c.wait_heartbeats(name, 1, timeout=60).last(0).n


def guest_lines(stdout: str) -> dict[str, str]:
    return {ln.split(":", 1)[0]: ln for ln in stdout.splitlines()
            if ": moved " in ln or ": stayed on " in ln}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster():
    home = Path(tempfile.mkdtemp(prefix="vmo", dir="/tmp"))
    c = NetnsCluster(home, hosts=3)
    try:
        yield c
    finally:
        c.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def guests(cluster):
    yield from guest_starter(cluster, ("host1", "host2", "host3"), "32M", "8M", "4M")


# ---------------------------------------------------------------- placement


def test_placement_books_memory_so_parallel_moves_spread():
    p = Placement({"a": 1000 * MIB, "b": 900 * MIB})
    assert p.take(200 * MIB, set()) == "a"         # most free first: a 800, b 900
    assert p.take(200 * MIB, set()) == "b"         # a 800, b 700
    assert p.take(200 * MIB, {"a"}) == "b"         # excluded: a tried already
    p.give_back("b", 200 * MIB)
    assert p.take(950 * MIB, set()) is None        # nobody has that much
    assert "no host has 950 MiB free (most: a with 800 MiB)" in p.describe(950 * MIB, set())


# ---------------------------------------------------------------- drain


def test_drain_moves_every_guest_then_undrain_readmits(cluster, guests):
    names = [guests(f"d{i}", "host1") for i in range(4)]
    before = {n: last_n(cluster, n) for n in names}
    t0 = time.monotonic()
    p = cluster.run("drain", "host1", "--parallel", "2")
    took = time.monotonic() - t0
    lines = guest_lines(p.stdout)
    assert set(lines) == set(names), p.stdout
    dests = {}
    for n in names:
        assert ": moved host1 -> host" in lines[n], lines[n]
        dests[n] = lines[n].split(" -> ")[1].split()[0]
    assert set(dests.values()) <= {"host2", "host3"}
    assert "host1 drained: 4 guests moved, 0 stayed" in p.stdout
    print(f"drain of 4 guests: {took:.1f} s ({took / 4:.2f} s per guest), to {dests}")
    # nothing new lands on host1: it is unschedulable first and stays so
    hosts = {h["name"]: h for h in cluster.json("hosts")}
    assert hosts["host1"]["schedulable"] is False
    assert "drained" in _fails(cluster, "run", "late", "--test-guest", "--on", "host1")
    assert "drained" in _fails(cluster, "send", "host1", names[0])
    # where the CLI and the store say they are is where they run, once
    ps = {v["name"]: v["host"] for v in cluster.json("ps", "--all")}
    assert ps == dests
    real = check_store_against_reality(cluster.home, cluster.cfg.store_url)
    assert {n: real[n][0][0] for n in names} == dests
    for n in names:
        continues(cluster, n, before[n])
    # an empty drained host drains again at once; undrain re-admits it
    again = cluster.json("drain", "host1")
    assert again["moved"] == [] and again["stayed"] == [] and again["ok"] is True
    out = cluster.run("undrain", "host1").stdout
    assert "host1 is schedulable again" in out
    assert {h["name"]: h for h in cluster.json("hosts")}["host1"]["schedulable"] is True
    guests("late", "host1")
    assert cluster.host_of("late") == "host1"


def test_drain_errors_are_one_line(cluster):
    assert "unknown host" in _fails(cluster, "drain", "host9")
    assert "--parallel" in _fails(cluster, "drain", "host1", "--parallel", "0")
    assert "unknown host 'nohost' in --to" in _fails(cluster, "drain", "host1", "--to", "nohost")
    assert "host being drained" in _fails(cluster, "drain", "host1", "--to", "host1")
    assert "unknown host" in _fails(cluster, "undrain", "host9")
    # a bad --to changes nothing
    assert all(h["schedulable"] for h in cluster.json("hosts"))


def test_a_guest_that_cannot_move_stays_and_is_reported(cluster, guests):
    hot = guests("hot", "host1", memory="128M", ws="96M", rate="64M")
    calm = guests("calm", "host1", ws="0", rate="0")          # idle: little to send
    before = {n: last_n(cluster, n) for n in (hot, calm)}
    # hot rewrites 96 MiB at 64 MiB/s; host1's link carries 100 Mbit/s: it
    # cannot converge within the 3 s the drain gives each guest.
    cluster.hosts["host1"].netem(rate_mbit=100, direction="out")
    try:
        p = cluster.run("drain", "host1", "--parallel", "2", "--migration-timeout", "3",
                        check=False, timeout=300)
    finally:
        cluster.hosts["host1"].clear_faults()
    assert p.returncode == 1, p.stderr
    err = p.stderr.strip()
    assert err == "vmigrate: 1 guests stayed on host1 (hot); host1 stays drained", err
    lines = guest_lines(p.stdout)
    assert "calm: moved host1 -> " in lines[calm], p.stdout
    assert "hot: stayed on host1: " in lines[hot] and "keeps running on host1" in lines[hot]
    assert cluster.host_of(hot) == "host1" and cluster.host_of(calm) != "host1"
    check_store_against_reality(cluster.home, cluster.cfg.store_url)
    for n in (hot, calm):
        continues(cluster, n, before[n])
    assert {h["name"]: h for h in cluster.json("hosts")}["host1"]["schedulable"] is False


# ---------------------------------------------------------------- rolling upgrade

SWITCH = '''\
"""Upgrade command for the tests: restart this host's agent (in its network
namespace) with the other of two installations of vmigrate."""
import json, os, signal, sys, time
from pathlib import Path

from vmigrate.cli.cluster import agent_argv, start_agent

host = os.environ["VMIGRATE_HOST"]
home = Path(os.environ["VMIGRATE_HOME"])
plan = json.loads((home / "switch.json").read_text())
state_dir = home / "cluster" / "hosts" / host
pid = json.loads((state_dir / "agent.json").read_text())["pid"]
running = Path(open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")[0].decode()).parent
a, b = plan["pythons"]
python = b if running == Path(a).parent else a
os.kill(pid, signal.SIGTERM)


def gone(pid):
    try:                       # a zombie (its parent never reaped it) is gone too
        return open(f"/proc/{pid}/stat").read().split(") ", 1)[1][0] == "Z"
    except OSError:
        return True


deadline = time.monotonic() + 30
while not gone(pid) and time.monotonic() < deadline:
    time.sleep(0.05)
h = plan["hosts"][host]
start_agent(agent_argv(host, h["listen"], state_dir, plan["store"], state_dir / "tls",
                       python=python), state_dir, netns_argv=h["netns"])
print(f"{host}: agent restarted with {python}", file=sys.stderr)
'''


@pytest.fixture(scope="module")
def previous(cluster):
    from tests.releases import (
        ReleaseUnavailable,
        previous_release,
        release_python,
        release_version,
    )

    try:
        python = release_python(previous_release())
    except ReleaseUnavailable as e:
        pytest.skip(str(e))
    plan = {"pythons": [sys.executable, str(python)], "store": cluster.cfg.store_url,
            "hosts": {n: {"listen": f"{h.ip}:7070", "netns": h.netns_argv([])}
                      for n, h in cluster.hosts.items()}}
    (cluster.home / "switch.json").write_text(json.dumps(plan))
    script = cluster.home / "switch.py"
    script.write_text(SWITCH)
    return {"python": python, "version": release_version(python),
            "command": f"{sys.executable} {script}"}


def test_rolling_upgrade_to_the_previous_release_and_back(cluster, guests, previous):
    from vmigrate.migrate import versions

    current = versions.software_version()
    names = [guests(f"r{i}", f"host{i}") for i in (1, 2, 3)]
    guests("r4", "host1")
    names.append("r4")
    before = {n: last_n(cluster, n) for n in names}
    for target, was in ((previous["version"], current), (current, previous["version"])):
        t0 = time.monotonic()
        r = cluster.json("rolling-upgrade", "--command", previous["command"], "--parallel", "2",
                         timeout=600)
        print(f"rolling upgrade {was} -> {target}: {time.monotonic() - t0:.1f} s", [
            (h["host"], round(h["drain_s"], 1), round(h["command_s"], 1), round(h["back_s"], 1))
            for h in r["hosts"]])
        assert r["ok"] is True
        assert [h["host"] for h in r["hosts"]] == ["host1", "host2", "host3"]
        for h in r["hosts"]:
            assert (h["version_before"], h["version_after"]) == (was, target), h
            assert h["lease_after"] and h["lease_after"] != h["lease_before"], h
            assert h["readmitted"] is True and h["ok"] is True
        hosts = cluster.json("hosts")
        assert {h["version"]["software_version"] for h in hosts} == {target}
        assert all(h["schedulable"] for h in hosts)
        check_store_against_reality(cluster.home, cluster.cfg.store_url)
        for n in names:
            continues(cluster, n, before[n])
    # mixed versions: a guest goes from the previous release to this one and back
    cluster.run("rolling-upgrade", "--command", previous["command"], "--hosts", "host3",
                timeout=300)
    assert {h["name"]: h["version"]["software_version"]
            for h in cluster.json("hosts")}["host3"] == previous["version"]
    for n in names:
        dest = "host3" if cluster.host_of(n) != "host3" else "host1"
        cluster.run("send", dest, n)
    on_old = next(n for n in names if cluster.host_of(n) == "host3")
    assert "too old to upgrade guests in place" in _fails(cluster, "upgrade", on_old)
    cluster.run("rolling-upgrade", "--command", previous["command"], "--hosts", "host3",
                timeout=300)
    check_store_against_reality(cluster.home, cluster.cfg.store_url)
    for n in names:
        continues(cluster, n, before[n])


def test_rolling_upgrade_stops_at_the_first_failure(cluster, guests):
    names = [guests("f1", "host2"), guests("f2", "host2"), guests("f3", "host3")]
    before = {n: last_n(cluster, n) for n in names}
    with open_store(cluster.cfg.store_url) as st:
        lease3 = st.get_host("host3").lease
    p = cluster.run("rolling-upgrade", "--command", "echo upgrading $VMIGRATE_HOST; exit 3",
                    "--hosts", "host2,host3", check=False)
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert "upgrading host2" in err[0]                   # the command's own output
    assert len(err) == 2 and err[1].startswith("vmigrate: rolling upgrade stopped at host2: "
                                               "the upgrade command failed on host2 "
                                               "(exit status 3)"), err
    assert "host2 stays drained" in err[1] and "not started: host3" in err[1], err[1]
    assert "Guests: " in err[1] and "f1" in err[1]
    with open_store(cluster.cfg.store_url) as st:
        assert st.get_host("host2").schedulable is False
        assert st.get_host("host3").lease == lease3     # never touched
        assert {v.owner for v in st.list_vms()} <= {"host1", "host3"}
    check_store_against_reality(cluster.home, cluster.cfg.store_url)
    for n in names:
        continues(cluster, n, before[n])
    # a command that does not restart the agent is caught too
    p = cluster.run("rolling-upgrade", "--command", "true", "--hosts", "host1",
                    "--timeout", "3", check=False)
    assert p.returncode == 1 and "did not come back within 3 s" in p.stderr, p.stderr
    assert "lease is unchanged" in p.stderr


# ---------------------------------------------------------------- same-host upgrade


def test_same_host_upgrade_hands_over_memory(cluster, guests):
    name = guests("inplace", "host1", memory="256M", ws="64M", rate="16M")
    before = last_n(cluster, name)
    ps = {v["name"]: v for v in cluster.json("ps")}
    old_pid = int(ps[name]["pid"])
    inode = memfd_inode(old_pid, name)
    with open_store(cluster.cfg.store_url) as st:
        owner = st.get_vm(name).owner
    r = cluster.json("upgrade", name)
    assert r["outcome"] == "completed" and r["source"] == r["destination"] == "host1"
    downtime, copied = float(r["downtime_ms"]), int(r["bytes_on_wire"])
    print(f"same-host upgrade of a 256 MiB guest: downtime {downtime:.1f} ms, {copied} bytes "
          f"copied, steps {r['downtime_steps']}")
    assert downtime < 500
    assert copied < 128 << 10, "only the state (and a console tail) is copied"
    assert int(r["guest_bytes"]) == 256 * MIB
    assert int(r["pages_raw"]) == int(r["pages_compressed"]) == 0
    new_pid = int({v["name"]: v for v in cluster.json("ps")}[name]["pid"])
    assert new_pid != old_pid and not pid_alive(old_pid)
    assert memfd_inode(new_pid, name) == inode, "the new VMM maps the very same memory"
    with open_store(cluster.cfg.store_url) as st:
        assert st.get_vm(name).owner == owner
    real = check_store_against_reality(cluster.home, cluster.cfg.store_url)
    assert real[name] == [("host1", "running", new_pid)]
    assert (cluster.home / "cluster" / "hosts" / "host1" / "vms" / name / "vmm.sock").exists()
    continues(cluster, name, before)
    # again (the new VMM's directory was renamed into place), and a paused guest
    cluster.run("upgrade", name)
    cluster.run("pause", name)
    cluster.run("upgrade", name)
    assert {v["name"]: v for v in cluster.json("ps")}[name]["state"] == "paused"
    cluster.run("resume", name)
    continues(cluster, name, before)
    assert "no VM named" in _fails(cluster, "upgrade", "nosuchvm")


def test_interrupted_upgrade_is_settled_when_the_agent_restarts(short_tmp):
    """The agent died half-way through an upgrade: on restart, a new VMM that
    never ran is discarded and the old one resumes; a new VMM that ran keeps
    the guest and the old one goes. Real VMMs, driven step by step."""
    from tests.guests import GuestProcess, guest_config
    from vmigrate.migrate import upgrade

    root = short_tmp / "vms"
    for ran in (False, True):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        old = GuestProcess(root / "g", guest_config("g", heartbeat_ms=100))
        new_proc = None
        try:
            old.client.boot()
            before = old.wait_heartbeats(3).last(0).n
            path = old.client.memory().path
            new_dir = root / f"{upgrade.UPGRADE_PREFIX}0123abcd-g"
            from vmigrate.vmm.client import spawn_vmm

            new_proc, new = spawn_vmm(new_dir, old.config, memory_file=path)
            reply = old.client.pause_and_save(upgrade.PAUSE_REASON, 0, dirty_log=False)
            new.restore(reply.state, console_history=reply.console)
            if ran:
                new.resume()
            new.close()
            notes = upgrade.settle_interrupted(root)      # what the agent does first
            assert len(notes) == 1 and ("completed" if ran else "undone") in notes[0], notes
            assert not new_dir.exists()
            if ran:
                assert old.proc.wait(10) is not None       # the stale VMM is gone
                assert read_pid(root / "g") == new_proc.pid
                client = VmmClient(root / "g")
                from vmigrate.vmm.testguest import report

                deadline = time.monotonic() + 20
                while True:
                    r = report.parse_bytes(b"".join(client.console_read()))
                    if r.last(0) is not None and r.last(0).n >= before + 3:
                        break
                    assert time.monotonic() < deadline, "the guest did not go on"
                    time.sleep(0.1)
                client.close()
            else:
                assert new_proc.wait(10) is not None
                assert old.client.status().state == vmm_pb2.VmmStatus.RUNNING
                r = old.wait_heartbeats(3, after=before)
            assert r.clean(), (r.problems, r.gaps())
        finally:
            if new_proc is not None and new_proc.poll() is None:
                from vmigrate.vmm.client import kill_vmm

                kill_vmm(new_proc.pid)
                new_proc.wait(5)
            if old.proc.poll() is None:
                old.close()
