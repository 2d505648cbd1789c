"""The cluster store, against a real SQLite file and a real etcd server.

Every test taking ``backend``/``store`` runs once per backend. etcd tests share
one etcd server per session, each under its own key prefix; the restart test
has its own server.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmigrate.migrate.store import (
    ClusterStore,
    Heartbeat,
    HostNotFound,
    HostUnavailable,
    MigrationInProgress,
    MigrationNotFound,
    MigrationState,
    MigrationStateError,
    NotOwner,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
    VmAlreadyExists,
    VmNotFound,
    open_store,
)


def _load_etcd_server():  # tests/ is not a package and not on sys.path (importlib mode)
    path = Path(__file__).with_name("etcd_server.py")
    spec = importlib.util.spec_from_file_location("vmigrate_tests_etcd_server", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


etcd_server = _load_etcd_server()
EtcdServer = etcd_server.EtcdServer


@dataclass
class Backend:
    kind: str
    url: str
    ttl: float  # a short lease for expiry tests (etcd: whole seconds, >= its minimum)

    def open(self) -> ClusterStore:
        return open_store(self.url)


def _need_etcd() -> None:
    missing = []
    if etcd_server.etcd_binary() is None:
        missing.append("the etcd binary (Debian package etcd-server)")
    if importlib.util.find_spec("etcd3gw") is None:
        missing.append("the etcd3gw package")
    if missing:
        msg = f"etcd tests need {' and '.join(missing)}: run scripts/setup.sh"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    _need_etcd()
    with EtcdServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite://{tmp_path}/cluster.db", ttl=0.5)
    server = request.getfixturevalue("etcd")
    return Backend("etcd", f"{server.url}/test-{uuid.uuid4().hex[:10]}", ttl=1)


@pytest.fixture
def store(backend: Backend) -> Iterator[ClusterStore]:
    with backend.open() as s:
        yield s


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(step)


def two_hosts(store: ClusterStore, ttl: float = 30) -> None:
    store.register_host("h1", "10.0.0.1:7000", {"version": "1.0"}, ttl)
    store.register_host("h2", "10.0.0.2:7000", {"version": "1.0"}, ttl)


# --------------------------------------------------------------------------- hosts


def test_register_update_deregister(store: ClusterStore) -> None:
    info = {"version": "1.2.0", "state_versions": [1, 3], "mem_total": 8 << 30, "caps": ["x"]}
    rec = store.register_host("h1", "10.0.0.1:7000", info, 30)
    assert (rec.name, rec.address, rec.info, rec.schedulable, rec.alive) == (
        "h1",
        "10.0.0.1:7000",
        info,
        True,
        True,
    )
    assert store.get_host("h1") == rec
    store.register_host("h0", "10.0.0.9:7000", {}, 30)
    assert [h.name for h in store.list_hosts()] == ["h0", "h1"]

    merged = store.update_host_info("h1", {"mem_free": 123})
    assert merged.info == {**info, "mem_free": 123}
    assert store.update_host_info("h1", {"a": 1}, replace=True).info == {"a": 1}

    again = store.register_host("h1", "10.0.0.1:7001", {"version": "1.3.0"}, 30)  # upsert
    assert again.address == "10.0.0.1:7001" and again.info == {"version": "1.3.0"}
    assert again.lease != rec.lease and again.registered_at == rec.registered_at
    assert store.keepalive("h1")

    store.deregister_host("h1")
    with pytest.raises(HostNotFound):
        store.get_host("h1")
    with pytest.raises(HostNotFound):
        store.deregister_host("h1")
    assert not store.keepalive("h1")
    assert [h.name for h in store.list_hosts()] == ["h0"]
    with pytest.raises(ValueError):
        store.register_host("bad/name", "x", {}, 30)
    with pytest.raises(ValueError):
        store.register_host("h3", "x", {"not json": object()}, 30)


def test_host_expiry_and_keepalive(backend: Backend, store: ClusterStore) -> None:
    ttl = backend.ttl
    store.register_host("h1", "a", {}, ttl)
    # Kept alive by the heartbeat helper for twice the TTL.
    hb = Heartbeat(store, "h1", interval_s=ttl / 4).start()
    time.sleep(2 * ttl)
    assert store.get_host("h1").alive and not hb.lost
    hb.stop()
    # Then it expires, shows as not alive (still listed), and its lease is lost for good.
    wait_until(lambda: not store.get_host("h1").alive, timeout=ttl + 3)
    assert [(h.name, h.alive) for h in store.list_hosts()] == [("h1", False)]
    assert store.keepalive("h1") is False
    assert store.get_host("h1").alive is False
    # Registering again gives a new lease.
    rec = store.register_host("h1", "a", {}, 30)
    assert rec.alive and store.keepalive("h1")


def test_other_process_registration_voids_old_lease(backend: Backend) -> None:
    with backend.open() as agent_old, backend.open() as agent_new:
        agent_old.register_host("h1", "a", {}, 30)
        agent_new.register_host("h1", "a", {}, 30)  # e.g. the agent restarted
        assert agent_new.keepalive("h1")
        assert agent_old.keepalive("h1") is False  # the old lease is not the host's any more
        assert agent_new.get_host("h1").alive


def test_drain_flag(store: ClusterStore) -> None:
    two_hosts(store)
    store.create_vm("vm1", "h1", {})
    assert store.set_schedulable("h2", False).schedulable is False
    with pytest.raises(HostUnavailable, match="drained"):
        store.begin_migration("vm1", "m1", "h1", "h2")
    # Re-registering (agent restart after an upgrade) keeps the host drained.
    assert store.register_host("h2", "b", {"version": "2.0"}, 30).schedulable is False
    assert store.set_schedulable("h2", True).schedulable is True
    assert store.begin_migration("vm1", "m1", "h1", "h2").state == MigrationState.PENDING
    with pytest.raises(HostNotFound):
        store.set_schedulable("nope", False)


# --------------------------------------------------------------------------- VMs


def test_vm_names_unique_and_owner_rules(backend: Backend, store: ClusterStore) -> None:
    two_hosts(store)
    vm = store.create_vm("vm1", "h1", {"mem_mib": 64, "vcpus": 1})
    assert store.get_vm("vm1") == vm and vm.owner == "h1" and vm.spec["mem_mib"] == 64
    with pytest.raises(VmAlreadyExists):
        store.create_vm("vm1", "h2", {})
    with backend.open() as other, pytest.raises(VmAlreadyExists):  # another agent
        other.create_vm("vm1", "h1", {})
    with pytest.raises(HostNotFound):
        store.create_vm("vm2", "ghost", {})
    store.create_vm("vm2", "h2", {})
    store.create_vm("vm0", "h1", {})
    assert [v.name for v in store.list_vms()] == ["vm0", "vm1", "vm2"]
    assert [v.name for v in store.list_vms(owner="h1")] == ["vm0", "vm1"]
    assert store.list_vms(owner="h3") == []

    assert store.update_vm_spec("vm1", {"mem_mib": 128}).spec == {"mem_mib": 128}
    with pytest.raises(NotOwner):
        store.update_vm_spec("vm1", {}, owner="h2")
    with pytest.raises(VmNotFound):
        store.update_vm_spec("nope", {})

    with pytest.raises(NotOwner):
        store.delete_vm("vm1", "h2")
    store.delete_vm("vm1", "h1")
    with pytest.raises(VmNotFound):
        store.get_vm("vm1")
    with pytest.raises(VmNotFound):
        store.delete_vm("vm1", "h1")
    store.create_vm("vm1", "h2", {})  # the name is free again


def test_thread_race_create_vm(backend: Backend) -> None:
    stores = [backend.open() for _ in range(2)]
    try:
        two_hosts(stores[0])
        barrier = threading.Barrier(6)
        results: list[str] = []

        def create(i: int) -> None:
            barrier.wait()
            try:
                stores[i % 2].create_vm("vm1", f"h{i % 2 + 1}", {"i": i})
                results.append("ok")
            except VmAlreadyExists:
                results.append("exists")

        threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["exists"] * 5 + ["ok"]
    finally:
        for s in stores:
            s.close()


# --------------------------------------------------------------------------- migrations


def test_migration_commit_path(store: ClusterStore) -> None:
    two_hosts(store)
    store.create_vm("vm1", "h1", {})
    assert store.get_migration("vm1") is None
    m = store.begin_migration("vm1", "m1", "h1", "h2")
    assert (m.vm, m.migration_id, m.src, m.dst, m.state) == ("vm1", "m1", "h1", "h2", "pending")
    assert m.dst_lease == store.get_host("h2").lease
    assert store.get_migration("vm1") == m and store.list_migrations() == [m]
    assert store.get_vm("vm1").owner == "h1"

    c = store.commit_migration("vm1", "m1")
    assert c.state == MigrationState.COMMITTED and store.get_vm("vm1").owner == "h2"
    assert store.commit_migration("vm1", "m1").state == MigrationState.COMMITTED  # idempotent
    assert store.abort_migration("vm1", "m1") is False  # the commit won
    with pytest.raises(MigrationNotFound):
        store.commit_migration("vm1", "other-id")
    with pytest.raises(MigrationInProgress):  # committed but not finished
        store.begin_migration("vm1", "m2", "h2", "h1")
    with pytest.raises(MigrationInProgress):
        store.delete_vm("vm1", "h2")

    assert store.finish_migration("vm1", "m1") is True
    assert store.finish_migration("vm1", "m1") is False
    assert store.get_migration("vm1") is None and store.list_migrations() == []
    with pytest.raises(MigrationNotFound):  # too late: the record is gone
        store.rollback_migration("vm1", "m1")
    store.begin_migration("vm1", "m2", "h2", "h1")  # and back


def test_migration_abort_path(store: ClusterStore) -> None:
    two_hosts(store)
    store.create_vm("vm1", "h1", {})
    store.begin_migration("vm1", "m1", "h1", "h2")
    with pytest.raises(MigrationStateError):
        store.finish_migration("vm1", "m1")  # pending: abort or commit first
    with pytest.raises(MigrationNotFound):
        store.abort_migration("vm1", "nope")
    assert store.abort_migration("vm1", "m1") is True
    assert store.abort_migration("vm1", "m1") is True  # idempotent
    with pytest.raises(MigrationStateError):
        store.commit_migration("vm1", "m1")  # the abort won
    assert store.get_vm("vm1").owner == "h1"
    assert store.get_migration("vm1").state == MigrationState.ABORTED
    # An aborted record does not block the next attempt; it is replaced.
    m2 = store.begin_migration("vm1", "m2", "h1", "h2")
    assert store.get_migration("vm1") == m2
    with pytest.raises(MigrationNotFound):
        store.commit_migration("vm1", "m1")  # a stale id cannot commit the new one


def test_second_begin_refused(store: ClusterStore) -> None:
    two_hosts(store)
    store.register_host("h3", "c", {}, 30)
    store.create_vm("vm1", "h1", {})
    with pytest.raises(NotOwner):
        store.begin_migration("vm1", "m0", "h2", "h3")
    with pytest.raises(VmNotFound):
        store.begin_migration("nope", "m0", "h1", "h2")
    with pytest.raises(HostNotFound):
        store.begin_migration("vm1", "m0", "h1", "ghost")
    with pytest.raises(HostUnavailable):
        store.begin_migration("vm1", "m0", "h1", "h1")
    store.begin_migration("vm1", "m1", "h1", "h2")
    with pytest.raises(MigrationInProgress):
        store.begin_migration("vm1", "m2", "h1", "h3")
    with pytest.raises(MigrationInProgress):
        store.begin_migration("vm1", "m1", "h1", "h2")  # even the same id
    with pytest.raises(MigrationInProgress):
        store.delete_vm("vm1", "h1")
    assert store.get_migration("vm1").migration_id == "m1"


def test_commit_to_dead_destination_refused(backend: Backend, store: ClusterStore) -> None:
    store.register_host("h1", "a", {}, 30)
    store.register_host("h2", "b", {}, backend.ttl)
    store.create_vm("vm1", "h1", {})
    store.create_vm("vm2", "h1", {})
    store.begin_migration("vm1", "m1", "h1", "h2")
    store.begin_migration("vm2", "m2", "h1", "h2")
    wait_until(lambda: not store.get_host("h2").alive, timeout=backend.ttl + 3)
    with pytest.raises(HostUnavailable, match="not alive"):
        store.commit_migration("vm1", "m1")
    assert store.get_vm("vm1").owner == "h1"
    assert store.get_migration("vm1").state == MigrationState.PENDING
    store.create_vm("vm3", "h1", {})
    with pytest.raises(HostUnavailable, match="not alive"):
        store.begin_migration("vm3", "m3", "h1", "h2")  # no new ones either
    # The destination comes back with a new lease: migrations begun under the
    # old one still cannot commit (the agent that lost its lease claims nothing).
    store.register_host("h2", "b", {}, 30)
    with pytest.raises(HostUnavailable, match="lost the lease"):
        store.commit_migration("vm2", "m2")
    assert store.abort_migration("vm1", "m1") and store.abort_migration("vm2", "m2")
    assert [v.owner for v in store.list_vms()] == ["h1", "h1", "h1"]


def test_rollback_rules(store: ClusterStore) -> None:
    two_hosts(store)
    store.create_vm("vm1", "h1", {})
    store.begin_migration("vm1", "m1", "h1", "h2")
    with pytest.raises(MigrationStateError):
        store.rollback_migration("vm1", "m1")  # pending: that is abort's job
    store.commit_migration("vm1", "m1")
    with pytest.raises(MigrationNotFound):
        store.rollback_migration("vm1", "m-other")
    r = store.rollback_migration("vm1", "m1")
    assert r.state == MigrationState.ROLLED_BACK and store.get_vm("vm1").owner == "h1"
    assert store.rollback_migration("vm1", "m1").state == MigrationState.ROLLED_BACK  # idempotent
    assert store.abort_migration("vm1", "m1") is False  # the commit had won
    with pytest.raises(MigrationStateError):
        store.commit_migration("vm1", "m1")  # no second commit after a rollback
    assert store.get_vm("vm1").owner == "h1"
    # Rolled back = over: a new migration may begin without finishing this one.
    store.begin_migration("vm1", "m2", "h1", "h2")
    store.abort_migration("vm1", "m2")
    assert store.finish_migration("vm1", "m2") is True

    store.begin_migration("vm1", "m3", "h1", "h2")
    with pytest.raises(MigrationStateError):
        store.rollback_migration("vm1", "m3")
    store.abort_migration("vm1", "m3")
    with pytest.raises(MigrationStateError):
        store.rollback_migration("vm1", "m3")  # aborted: nothing to roll back


# --------------------------------------------------------------------------- races


def test_commit_abort_race_threads(backend: Backend) -> None:
    """Source and destination race commit against abort: exactly one side wins."""
    stores = [backend.open() for _ in range(2)]  # two agents, each used by several threads
    try:
        two_hosts(stores[0])
        stores[0].create_vm("vm1", "h1", {})
        n = 6
        for rnd in range(8):
            mid = f"m{rnd}"
            src = "h1" if rnd % 2 == 0 else "h2"
            dst = "h2" if src == "h1" else "h1"
            if stores[0].get_vm("vm1").owner != src:
                src, dst = dst, src
            stores[0].begin_migration("vm1", mid, src, dst)
            barrier = threading.Barrier(n)
            outcome: list[str] = []

            def race(
                i: int,
                mid: str = mid,
                barrier: threading.Barrier = barrier,
                outcome: list[str] = outcome,
            ) -> None:
                s = stores[i % 2]
                barrier.wait()
                if i % 2 == 0:
                    try:
                        s.commit_migration("vm1", mid)
                        outcome.append("commit")
                    except MigrationStateError:
                        outcome.append("-")
                elif s.abort_migration("vm1", mid):
                    outcome.append("abort")
                else:
                    outcome.append("-")

            threads = [threading.Thread(target=race, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            winners = set(outcome) - {"-"}
            assert len(outcome) == n and len(winners) == 1, outcome
            final = stores[1].get_migration("vm1")
            owner = stores[1].get_vm("vm1").owner
            if winners == {"commit"}:
                assert final.state == MigrationState.COMMITTED and owner == dst
                assert outcome.count("commit") == n // 2  # commit is idempotent
            else:
                assert final.state == MigrationState.ABORTED and owner == src
            stores[1].finish_migration("vm1", mid)
    finally:
        for s in stores:
            s.close()


_WORKER = r"""
import json, sys
from vmigrate.migrate.store import StoreError, open_store
store = open_store(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    op, vm, mid, *rest = line.split()
    try:
        if op == "commit":
            result = store.commit_migration(vm, mid).state.value
        elif op == "abort":
            result = store.abort_migration(vm, mid)
        elif op == "begin":
            result = store.begin_migration(vm, mid, rest[0], rest[1]).migration_id
        else:
            raise SystemExit(f"bad op {op}")
        out = {"ok": True, "result": result}
    except StoreError as e:
        out = {"ok": False, "error": type(e).__name__}
    print(json.dumps(out), flush=True)
"""


class Workers:
    """Agent processes that each run one store operation per line, when told."""

    def __init__(self, url: str, n: int) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, url],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(n)
        ]
        for p in self.procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"

    def run(self, lines: list[str]) -> list[dict]:
        for p, line in zip(self.procs, lines, strict=True):  # all start at (nearly) once
            assert p.stdin is not None
            p.stdin.write(line + "\n")
            p.stdin.flush()
        out = []
        for p in self.procs:
            assert p.stdout is not None
            out.append(json.loads(p.stdout.readline()))
        return out

    def close(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_races_across_processes(backend: Backend, store: ClusterStore) -> None:
    """Several agent processes: one begin wins, then exactly one of commit/abort."""
    two_hosts(store)
    store.register_host("h3", "c", {}, 30)
    store.create_vm("vm1", "h1", {})
    workers = Workers(backend.url, 4)
    try:
        commits = aborts = 0
        for rnd in range(6):
            owner = store.get_vm("vm1").owner
            dsts = [h for h in ("h1", "h2", "h3") if h != owner]
            begun = workers.run([f"begin vm1 r{rnd}-p{i} {owner} {dsts[i % 2]}" for i in range(4)])
            winners = [i for i, r in enumerate(begun) if r["ok"]]
            assert len(winners) == 1, begun
            assert all(r["error"] == "MigrationInProgress" for r in begun if not r["ok"])
            mig = store.get_migration("vm1")
            assert mig.migration_id == f"r{rnd}-p{winners[0]}"

            ops = ["commit", "abort", "commit", "abort"]
            raced = workers.run([f"{op} vm1 {mig.migration_id}" for op in ops])
            committed = [r["ok"] for op, r in zip(ops, raced, strict=True) if op == "commit"]
            aborted = [
                r["ok"] and r["result"] for op, r in zip(ops, raced, strict=True) if op == "abort"
            ]
            assert (all(committed) and not any(aborted)) or (all(aborted) and not any(committed)), (
                raced
            )
            final = store.get_migration("vm1")
            if all(committed):
                commits += 1
                assert final.state == "committed" and store.get_vm("vm1").owner == mig.dst
            else:
                aborts += 1
                assert final.state == "aborted" and store.get_vm("vm1").owner == owner
                assert all(r["error"] == "MigrationStateError" for r in raced if not r["ok"])
            store.finish_migration("vm1", mig.migration_id)
        assert commits + aborts == 6
    finally:
        workers.close()


# --------------------------------------------------------------------------- availability


def _blackhole() -> socket.socket:
    """A TCP port that accepts connections (kernel backlog) but never answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def test_unreachable_store_fails_fast(tmp_path: Path) -> None:
    _need_etcd()
    port = etcd_server.free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as refused:
        open_store(f"etcd://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 2
    assert "\n" not in str(refused.value) and f"127.0.0.1:{port}" in str(refused.value)
    assert "refused" in str(refused.value)

    with _blackhole() as hole:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"no answer within 0\.5s"):
            open_store(f"etcd://127.0.0.1:{hole.getsockname()[1]}?timeout=0.5")
        assert time.monotonic() - t0 < 3

    # Something that speaks HTTP but is not etcd.
    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(StoreUnavailable) as not_etcd:
            open_store(f"etcd://127.0.0.1:{server.server_address[1]}?timeout=2")
        assert "\n" not in str(not_etcd.value)
    finally:
        server.shutdown()
        server.server_close()

    with pytest.raises(StoreUnavailable, match="does not exist"):
        open_store(f"sqlite://{tmp_path}/no/such/dir/cluster.db")
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable) as garbage:
        open_store(f"sqlite://{tmp_path}/garbage.db")
    assert "\n" not in str(garbage.value)

    for bad in ("cluster.db", "mysql://x", "etcd://h:notaport", "sqlite://", "etcd://h?x=1"):
        with pytest.raises(StoreConfigError):
            open_store(bad)


def test_sqlite_locked_database_is_unavailable(tmp_path: Path) -> None:
    import sqlite3

    url = f"sqlite://{tmp_path}/cluster.db?timeout=0.2"
    with open_store(url) as store:
        two_hosts(store)
        blocker = sqlite3.connect(tmp_path / "cluster.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="locked"):
                store.create_vm("vm1", "h1", {})
            assert time.monotonic() - t0 < 2
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        store.create_vm("vm1", "h1", {})


def test_etcd_restart() -> None:
    _need_etcd()
    with EtcdServer() as server:
        store = open_store(server.url + "/restart?timeout=1")
        try:
            two_hosts(store)
            store.create_vm("vm1", "h1", {"mem_mib": 64})
            store.begin_migration("vm1", "m1", "h1", "h2")

            server.stop()
            for call in (
                lambda: store.get_vm("vm1"),
                lambda: store.commit_migration("vm1", "m1"),
                lambda: store.keepalive("h1"),
            ):
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable) as down:
                    call()
                assert time.monotonic() - t0 < 2.5
                assert "\n" not in str(down.value)

            server.start()  # same data dir, same ports
            assert store.get_vm("vm1").spec == {"mem_mib": 64}
            assert store.keepalive("h1") and store.keepalive("h2")  # leases survive
            assert store.commit_migration("vm1", "m1").state == MigrationState.COMMITTED
            assert store.get_vm("vm1").owner == "h2"
            with open_store(server.url + "/restart") as fresh:
                assert fresh.get_migration("vm1").state == MigrationState.COMMITTED
        finally:
            store.close()


def test_prefixes_isolate_clusters(etcd: EtcdServer) -> None:
    with open_store(etcd.url + "/a") as a, open_store(etcd.url + "/ab") as ab:
        a.register_host("h1", "x", {}, 30)
        a.create_vm("vm1", "h1", {})
        assert ab.list_hosts() == [] and ab.list_vms() == []
        with pytest.raises(VmNotFound):
            ab.get_vm("vm1")


def test_closed_store(backend: Backend) -> None:
    s = backend.open()
    s.close()
    with pytest.raises(StoreError):
        s.list_hosts()
