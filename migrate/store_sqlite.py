"""SQLite cluster store: one database file shared by the agents of one machine.

* WAL journal (readers never block the writer), ``synchronous=NORMAL``: a
  commit that returned survives any process crash; a power cut may lose the
  last commits, but this store serves the agents of ONE machine, whose guests
  all die with the power, so a lost ownership change harms nothing (nothing
  can then run twice), while FULL's fsync would add ~2 ms to every migration's
  downtime (the commit is on that path). Real clusters use etcd. A
  busy timeout (``timeout_s``) after which a locked database is reported as
  StoreUnavailable.
* Every read-check-write runs inside one ``BEGIN IMMEDIATE`` transaction, so
  the checks in ``store.check_*`` and the writes are a single atomic
  compare-and-swap across threads and processes.
* Liveness: ``hosts.expires_at`` is wall-clock time (``time.time()``); a host
  is alive while ``expires_at > now``. Monotonic clocks differ per process, so
  they cannot be used for a deadline that other processes read; every process
  on the machine shares the wall clock (an NTP step moves all deadlines at
  once, which can expire or extend leases early/late by the step).
  ``keepalive`` only extends an unexpired lease with the same lease id: a lost
  lease stays lost until the host registers again (new id).
* One connection per thread (sqlite3 connections are not shared across
  threads). ``PRAGMA user_version`` holds the schema version.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from .store import (
    ClusterStore,
    HostNotFound,
    HostRecord,
    MigrationRecord,
    MigrationState,
    NotOwner,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
    VmAlreadyExists,
    VmNotFound,
    VmRecord,
    check_abort,
    check_begin,
    check_commit,
    check_delete_vm,
    check_finish,
    check_name,
    check_rollback,
    dump_json,
    one_line,
)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hosts (
    name          TEXT PRIMARY KEY,
    address       TEXT NOT NULL,
    info          TEXT NOT NULL,
    schedulable   INTEGER NOT NULL,
    ttl_s         REAL NOT NULL,
    lease         TEXT NOT NULL,
    expires_at    REAL NOT NULL,
    registered_at REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS vms (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    spec       TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS vms_by_owner ON vms (owner);
CREATE TABLE IF NOT EXISTS migrations (
    vm           TEXT PRIMARY KEY,
    migration_id TEXT NOT NULL,
    src          TEXT NOT NULL,
    dst          TEXT NOT NULL,
    state        TEXT NOT NULL,
    dst_lease    TEXT NOT NULL,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
"""

_HOST_COLS = "name, address, info, schedulable, ttl_s, lease, expires_at, registered_at, updated_at"
_VM_COLS = "name, owner, spec, created_at, updated_at"
_MIG_COLS = "vm, migration_id, src, dst, state, dst_lease, created_at, updated_at"


def _now() -> float:
    # Wall clock on purpose: deadlines are compared across processes (see module doc).
    return time.time()


def _host(row: tuple[Any, ...], now: float) -> HostRecord:
    name, address, info, sched, ttl_s, lease, expires_at, registered_at, updated_at = row
    return HostRecord(
        name=name,
        address=address,
        info=json.loads(info),
        schedulable=bool(sched),
        alive=expires_at > now,
        ttl_s=ttl_s,
        lease=lease,
        registered_at=registered_at,
        updated_at=updated_at,
    )


def _vm(row: tuple[Any, ...]) -> VmRecord:
    name, owner, spec, created_at, updated_at = row
    return VmRecord(name, owner, json.loads(spec), created_at, updated_at)


def _mig(row: tuple[Any, ...]) -> MigrationRecord:
    vm, mid, src, dst, state, dst_lease, created_at, updated_at = row
    return MigrationRecord(
        vm, mid, src, dst, MigrationState(state), dst_lease, created_at, updated_at
    )


class SqliteStore(ClusterStore):
    def __init__(self, path: str, *, timeout_s: float = 5.0, url: str | None = None) -> None:
        self.path = os.fspath(path)
        self.url = url or f"sqlite://{self.path}"
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: dict[threading.Thread, sqlite3.Connection] = {}
        self._leases: dict[str, str] = {}  # host -> lease this store registered
        self._closed = False
        self._init_schema()

    # ------------------------------------------------------------------ plumbing

    def _fail(self, e: sqlite3.Error) -> StoreUnavailable:
        msg = one_line(e)
        if "locked" in msg or "busy" in msg:
            msg = f"database locked for more than {self.timeout_s:g}s ({msg})"
        return StoreUnavailable(f"sqlite store {self.path} unavailable: {msg}")

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StoreError(f"{self.url}: store is closed")
        if not os.path.isdir(os.path.dirname(os.path.abspath(self.path))):
            raise StoreUnavailable(
                f"sqlite store {self.path} unavailable: directory "
                f"{os.path.dirname(os.path.abspath(self.path))} does not exist"
            )
        try:
            # check_same_thread=False only so that close() may close other threads'
            # connections; each connection is used by the thread that opened it.
            conn = sqlite3.connect(
                self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False
            )
            try:
                # Changing the journal mode needs a moment of exclusive access:
                # retry while another process is doing the same on a new file.
                deadline = time.monotonic() + self.timeout_s
                while True:
                    try:
                        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                        break
                    except sqlite3.OperationalError as e:
                        if "locked" not in str(e) or time.monotonic() > deadline:
                            raise
                        time.sleep(0.01)
                if str(mode).lower() != "wal":
                    raise StoreUnavailable(
                        f"sqlite store {self.path} unavailable: cannot use WAL journal ({mode})"
                    )
                conn.execute("PRAGMA synchronous=NORMAL")
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as e:
            raise self._fail(e)
        self._local.conn = conn
        with self._lock:  # forget (and close) the connections of threads that ended
            stale = [self._conns.pop(t) for t in list(self._conns) if not t.is_alive()]
            self._conns[threading.current_thread()] = conn
        for old in stale:
            with contextlib.suppress(sqlite3.Error):
                old.close()
        return conn

    @contextlib.contextmanager
    def _txn(self, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction: BEGIN IMMEDIATE for writes (takes the write lock up
        front, so the checks and the writes are atomic), BEGIN for consistent reads."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as e:
            raise self._fail(e)
        try:
            yield conn
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise self._fail(e)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise self._fail(e)

    def _init_schema(self) -> None:
        with self._txn(write=True) as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreConfigError(
                    f"sqlite store {self.path} has schema version {version}; "
                    f"this vmigrate knows up to {SCHEMA_VERSION}"
                )
            if version < SCHEMA_VERSION:
                # (executescript would COMMIT first: run the statements one by one)
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @staticmethod
    def _get_host(c: sqlite3.Connection, name: str, now: float) -> HostRecord | None:
        row = c.execute(f"SELECT {_HOST_COLS} FROM hosts WHERE name=?", (name,)).fetchone()
        return _host(row, now) if row else None

    @staticmethod
    def _get_vm(c: sqlite3.Connection, name: str) -> VmRecord | None:
        row = c.execute(f"SELECT {_VM_COLS} FROM vms WHERE name=?", (name,)).fetchone()
        return _vm(row) if row else None

    @staticmethod
    def _get_mig(c: sqlite3.Connection, vm: str) -> MigrationRecord | None:
        row = c.execute(f"SELECT {_MIG_COLS} FROM migrations WHERE vm=?", (vm,)).fetchone()
        return _mig(row) if row else None

    # ------------------------------------------------------------------ hosts

    def register_host(
        self, name: str, address: str, info: Mapping[str, Any], ttl_s: float
    ) -> HostRecord:
        check_name("host", name)
        info_json = dump_json("info", info)
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        lease = uuid.uuid4().hex
        with self._txn(write=True) as c:
            now = _now()
            old = self._get_host(c, name, now)
            c.execute(
                f"INSERT OR REPLACE INTO hosts ({_HOST_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    address,
                    info_json,
                    int(old.schedulable) if old else 1,
                    float(ttl_s),
                    lease,
                    now + ttl_s,
                    old.registered_at if old else now,
                    now,
                ),
            )
            rec = self._get_host(c, name, now)
        assert rec is not None
        with self._lock:
            self._leases[name] = lease
        return rec

    def keepalive(self, name: str) -> bool:
        with self._lock:
            lease = self._leases.get(name)
        with self._txn(write=True) as c:
            now = _now()
            host = self._get_host(c, name, now)
            ok = host is not None and host.alive and (lease is None or host.lease == lease)
            if ok:
                c.execute("UPDATE hosts SET expires_at=? WHERE name=?", (now + host.ttl_s, name))
        if not ok:
            with self._lock:
                if self._leases.get(name) == lease:
                    self._leases.pop(name, None)
        return ok

    def get_host(self, name: str) -> HostRecord:
        rows = self._select(f"SELECT {_HOST_COLS} FROM hosts WHERE name=?", (name,))
        if not rows:
            raise HostNotFound(f"host {name} is not registered")
        return _host(rows[0], _now())

    def list_hosts(self) -> list[HostRecord]:
        now = _now()
        rows = self._select(f"SELECT {_HOST_COLS} FROM hosts ORDER BY name")
        return [_host(r, now) for r in rows]

    def _select(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise self._fail(e)

    def _update_host(self, name: str, **changes: Any) -> HostRecord:
        with self._txn(write=True) as c:
            now = _now()
            if self._get_host(c, name, now) is None:
                raise HostNotFound(f"host {name} is not registered")
            sets = ", ".join(f"{k}=?" for k in changes)
            c.execute(
                f"UPDATE hosts SET {sets}, updated_at=? WHERE name=?",
                (*changes.values(), now, name),
            )
            rec = self._get_host(c, name, now)
        assert rec is not None
        return rec

    def set_schedulable(self, name: str, schedulable: bool) -> HostRecord:
        return self._update_host(name, schedulable=int(bool(schedulable)))

    def update_host_info(
        self, name: str, info: Mapping[str, Any], *, replace: bool = False
    ) -> HostRecord:
        dump_json("info", info)
        with self._txn(write=True) as c:
            now = _now()
            host = self._get_host(c, name, now)
            if host is None:
                raise HostNotFound(f"host {name} is not registered")
            new = dict(info) if replace else {**host.info, **info}
            c.execute(
                "UPDATE hosts SET info=?, updated_at=? WHERE name=?",
                (dump_json("info", new), now, name),
            )
            rec = self._get_host(c, name, now)
        assert rec is not None
        return rec

    def deregister_host(self, name: str) -> None:
        with self._txn(write=True) as c:
            if c.execute("DELETE FROM hosts WHERE name=?", (name,)).rowcount == 0:
                raise HostNotFound(f"host {name} is not registered")
        with self._lock:
            self._leases.pop(name, None)

    # ------------------------------------------------------------------ VMs

    def create_vm(self, name: str, owner: str, spec: Mapping[str, Any]) -> VmRecord:
        check_name("VM", name)
        spec_json = dump_json("spec", spec)
        with self._txn(write=True) as c:
            now = _now()
            if self._get_vm(c, name) is not None:
                raise VmAlreadyExists(f"VM {name} already exists")
            if self._get_host(c, owner, now) is None:
                raise HostNotFound(f"owner host {owner} is not registered")
            c.execute(
                f"INSERT INTO vms ({_VM_COLS}) VALUES (?,?,?,?,?)",
                (name, owner, spec_json, now, now),
            )
            # A leftover aborted/rolled-back record of a deleted namesake.
            c.execute("DELETE FROM migrations WHERE vm=?", (name,))
        return VmRecord(name, owner, json.loads(spec_json), now, now)

    def get_vm(self, name: str) -> VmRecord:
        rows = self._select(f"SELECT {_VM_COLS} FROM vms WHERE name=?", (name,))
        if not rows:
            raise VmNotFound(f"VM {name} does not exist")
        return _vm(rows[0])

    def list_vms(self, owner: str | None = None) -> list[VmRecord]:
        if owner is None:
            rows = self._select(f"SELECT {_VM_COLS} FROM vms ORDER BY name")
        else:
            rows = self._select(f"SELECT {_VM_COLS} FROM vms WHERE owner=? ORDER BY name", (owner,))
        return [_vm(r) for r in rows]

    def update_vm_spec(
        self, name: str, spec: Mapping[str, Any], *, owner: str | None = None
    ) -> VmRecord:
        spec_json = dump_json("spec", spec)
        with self._txn(write=True) as c:
            vm = self._get_vm(c, name)
            if vm is None:
                raise VmNotFound(f"VM {name} does not exist")
            if owner is not None and vm.owner != owner:
                raise NotOwner(f"VM {name} is owned by {vm.owner}, not {owner}")
            now = _now()
            c.execute("UPDATE vms SET spec=?, updated_at=? WHERE name=?", (spec_json, now, name))
        return VmRecord(name, vm.owner, json.loads(spec_json), vm.created_at, now)

    def delete_vm(self, name: str, owner: str) -> None:
        with self._txn(write=True) as c:
            check_delete_vm(name, self._get_vm(c, name), self._get_mig(c, name), owner)
            c.execute("DELETE FROM vms WHERE name=?", (name,))
            c.execute("DELETE FROM migrations WHERE vm=?", (name,))

    # ------------------------------------------------------------------ migrations

    def begin_migration(self, vm: str, migration_id: str, src: str, dst: str) -> MigrationRecord:
        check_name("migration", migration_id)
        with self._txn(write=True) as c:
            now = _now()
            dst_host = self._get_host(c, dst, now)
            check_begin(vm, self._get_vm(c, vm), self._get_mig(c, vm), src, dst, dst_host)
            assert dst_host is not None
            rec = MigrationRecord(
                vm, migration_id, src, dst, MigrationState.PENDING, dst_host.lease, now, now
            )
            c.execute(
                f"INSERT OR REPLACE INTO migrations ({_MIG_COLS}) VALUES (?,?,?,?,?,?,?,?)",
                (vm, migration_id, src, dst, rec.state.value, rec.dst_lease, now, now),
            )
        return rec

    def _set_state(
        self, c: sqlite3.Connection, mig: MigrationRecord, state: MigrationState, now: float
    ) -> MigrationRecord:
        c.execute(
            "UPDATE migrations SET state=?, updated_at=? WHERE vm=? AND migration_id=?",
            (state.value, now, mig.vm, mig.migration_id),
        )
        return MigrationRecord(
            mig.vm, mig.migration_id, mig.src, mig.dst, state, mig.dst_lease, mig.created_at, now
        )

    def commit_migration(self, vm: str, migration_id: str) -> MigrationRecord:
        with self._txn(write=True) as c:
            now = _now()
            mig = self._get_mig(c, vm)
            dst_host = self._get_host(c, mig.dst, now) if mig else None
            alive_lease = dst_host.lease if dst_host and dst_host.alive else None
            if not check_commit(vm, self._get_vm(c, vm), mig, migration_id, alive_lease):
                assert mig is not None
                return mig
            assert mig is not None
            c.execute("UPDATE vms SET owner=?, updated_at=? WHERE name=?", (mig.dst, now, vm))
            return self._set_state(c, mig, MigrationState.COMMITTED, now)

    def abort_migration(self, vm: str, migration_id: str) -> bool:
        with self._txn(write=True) as c:
            mig = self._get_mig(c, vm)
            answer = check_abort(vm, mig, migration_id)
            if answer is not None:
                return answer
            assert mig is not None
            self._set_state(c, mig, MigrationState.ABORTED, _now())
            return True

    def rollback_migration(self, vm: str, migration_id: str) -> MigrationRecord:
        with self._txn(write=True) as c:
            mig = self._get_mig(c, vm)
            apply = check_rollback(vm, self._get_vm(c, vm), mig, migration_id)
            assert mig is not None
            if not apply:
                return mig
            now = _now()
            c.execute("UPDATE vms SET owner=?, updated_at=? WHERE name=?", (mig.src, now, vm))
            return self._set_state(c, mig, MigrationState.ROLLED_BACK, now)

    def finish_migration(self, vm: str, migration_id: str) -> bool:
        with self._txn(write=True) as c:
            if not check_finish(vm, self._get_mig(c, vm), migration_id):
                return False
            c.execute("DELETE FROM migrations WHERE vm=? AND migration_id=?", (vm, migration_id))
            return True

    def get_migration(self, vm: str) -> MigrationRecord | None:
        rows = self._select(f"SELECT {_MIG_COLS} FROM migrations WHERE vm=?", (vm,))
        return _mig(rows[0]) if rows else None

    def list_migrations(self) -> list[MigrationRecord]:
        return [_mig(r) for r in self._select(f"SELECT {_MIG_COLS} FROM migrations ORDER BY vm")]

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()
