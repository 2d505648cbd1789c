"""Cluster operations on a real etcd: a local cluster made the documented way
(`vmigrate up --store etcd://127.0.0.1:PORT`), drained; and an agent killed in
the middle of a drain: its lease expires, no guest is owned twice or by
nobody, and once the agent is back the drain finishes.

The store is checked against what really runs: the VMM processes under each
host's state directory (tests/test_cluster_ops.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster import VMIGRATE, LocalCluster, guest_starter
from tests.test_cluster_ops import check_store_against_reality, continues, guest_lines, last_n
from vmigrate.migrate.store import open_store

HOLD_S = 6.0


@pytest.fixture(scope="module")
def etcd():
    from tests.etcd_server import EtcdServer, etcd_binary

    if etcd_binary() is None or importlib.util.find_spec("etcd3gw") is None:
        msg = "etcd tests need the etcd binary (etcd-server) and etcd3gw: run scripts/setup.sh"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="module")
def cluster(etcd):
    home = Path(tempfile.mkdtemp(prefix="vme", dir="/tmp"))
    c = LocalCluster(home, hosts=3, store=etcd.url)
    try:
        yield c
    finally:
        c.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def guests(cluster):
    yield from guest_starter(cluster, ("host1", "host2", "host3"), "64M", "16M", "4M")


def agent_pid(cluster: LocalCluster, host: str) -> int:
    import json

    return int(json.loads((cluster.home / "cluster" / "hosts" / host / "agent.json")
                          .read_text())["pid"])


def test_up_with_an_etcd_store(cluster, etcd):
    hosts = cluster.json("hosts")
    assert [h["name"] for h in hosts] == ["host1", "host2", "host3"]
    assert all(h["alive"] and h["schedulable"] for h in hosts)
    with open_store(etcd.url) as st:                 # the records live in etcd
        assert [h.name for h in st.list_hosts() if h.alive] == ["host1", "host2", "host3"]
    assert cluster.json("version")["software_version"]


def test_drain_on_etcd(cluster, etcd, guests):
    names = [guests(f"e{i}", "host1") for i in range(3)]
    before = {n: last_n(cluster, n) for n in names}
    t0 = time.monotonic()
    r = cluster.json("drain", "host1", "--parallel", "2")
    print(f"etcd drain of 3 guests: {time.monotonic() - t0:.1f} s")
    assert r["ok"] is True and r["stayed"] == []
    assert sorted(g["vm"] for g in r["moved"]) == names
    assert {g["destination"] for g in r["moved"]} <= {"host2", "host3"}
    with open_store(etcd.url) as st:
        assert st.get_host("host1").schedulable is False
        assert {v.owner for v in st.list_vms()} <= {"host2", "host3"}
        assert st.list_migrations() == []          # every move finished its record
    check_store_against_reality(cluster.home, etcd.url)
    for n in names:
        continues(cluster, n, before[n])
    cluster.run("undrain", "host1")
    with open_store(etcd.url) as st:
        assert st.get_host("host1").schedulable is True


def test_agent_killed_mid_drain(cluster, etcd, guests):
    """host1's agent is killed while it migrates a guest away (held in
    pre-copy, migrate/faults.py): the drain reports what stayed, the agent's
    lease expires, every guest runs exactly once where the store says; after
    the agent restarts, draining again moves everything."""
    # Restart host1's agent so that each of its migrations holds in pre-copy.
    os.kill(agent_pid(cluster, "host1"), signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open_store(etcd.url) as st:
            if "host1" not in {h.name for h in st.list_hosts() if h.alive}:
                break
        time.sleep(0.1)
    env = {**cluster.env(), "VMIGRATE_HOLD": f"source:precopy={HOLD_S}"}
    subprocess.run([*VMIGRATE, "up", "--hosts", "3"], env=env, check=True, capture_output=True,
                   timeout=120)
    names = [guests(f"k{i}", "host1") for i in range(3)]
    before = {n: last_n(cluster, n) for n in names}
    log = cluster.home / "cluster" / "hosts" / "host1" / "agent.log"
    holds_before = log.read_text().count("holding")
    drain = subprocess.Popen([*VMIGRATE, "drain", "host1", "--parallel", "1"], env=cluster.env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count("holding") == holds_before:   # the first move is held
            assert time.monotonic() < deadline and drain.poll() is None, "no hold"
            time.sleep(0.05)
        time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(agent_pid(cluster, "host1"), signal.SIGKILL)
        out, err = drain.communicate(timeout=120)
    finally:
        if drain.poll() is None:
            drain.kill()
    assert drain.returncode == 1, (out, err)
    lines = guest_lines(out)
    assert len(lines) == 3 and all(": stayed on host1: " in ln for ln in lines.values()), out
    assert "stopped answering" in out or "unreachable" in out, out
    assert err.strip().startswith("vmigrate: 3 guests stayed on host1"), err

    # The lease of the dead agent expires (TTL 10 s); nobody else claims its guests.
    with open_store(etcd.url) as st:
        while st.get_host("host1").alive:
            assert time.monotonic() - killed_at < 30, "host1's lease did not expire"
            time.sleep(0.2)
        lost_after = time.monotonic() - killed_at
        print(f"host1's lease expired {lost_after:.1f} s after its agent was killed")
        assert {v.owner for v in st.list_vms() if v.name in names} == {"host1"}
        pending = [m for m in st.list_migrations() if m.vm in names]
    # The move that was in flight (held in pre-copy) is still pending: nobody
    # aborted it, and its destination cannot commit it without the source.
    assert [(m.src, m.state) for m in pending] == [("host1", "pending")], pending
    print(f"in flight when the agent died: {pending[0].vm} -> {pending[0].dst}")
    # Its VMMs live on: each guest runs once, on host1, as the store says (a
    # half-arrived copy at the destination is not running).
    real = check_store_against_reality(cluster.home, etcd.url, strict=False)
    for n in names:
        assert [(h, s) for h, s, _ in real[n] if s in ("running", "paused")] == \
            [("host1", "running")], real[n]
    ps = {(v["name"], v["host"]): v["state"] for v in cluster.json("ps", "--all")}
    assert all(ps.get((n, "host1")) == "unknown" for n in names), ps
    assert all(state == "incoming" for (n, h), state in ps.items() if h != "host1"), ps
    assert "down" in _drain_fails(cluster)

    # The agent comes back (the documented way: `vmigrate up` starts what is
    # missing), adopts its guests, and the drain completes.
    cluster.run("up", "--hosts", "3")
    # The restarted agent settles the migration its predecessor left pending
    # (it aborts it: no send can be running), so nothing waits for timeouts.
    with open_store(etcd.url) as st:
        deadline = time.monotonic() + 20
        while any(m.state == "pending" for m in st.list_migrations()):
            assert time.monotonic() < deadline, st.list_migrations()
            time.sleep(0.2)
    r = cluster.json("drain", "host1", "--parallel", "2")
    assert r["ok"] is True and sorted(g["vm"] for g in r["moved"]) == names, r
    deadline = time.monotonic() + 30
    while True:     # the destination drops its half-arrived copy once it is aborted
        try:
            check_store_against_reality(cluster.home, etcd.url, strict=True)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    with open_store(etcd.url) as st:
        assert [m for m in st.list_migrations() if m.vm in names] == []
    for n in names:
        continues(cluster, n, before[n])


def _drain_fails(cluster: LocalCluster) -> str:
    p = cluster.run("drain", "host1", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    return p.stderr
