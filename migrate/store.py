"""The cluster store: hosts, VMs and their owner host, migrations in flight.

One interface (:class:`ClusterStore`), two implementations, chosen by URL with
:func:`open_store`:

* ``sqlite:///path/to/cluster.db`` -- one SQLite file shared by the agents of
  one machine (``migrate/store_sqlite.py``): WAL journal, a busy timeout, every
  compare-and-swap in one ``BEGIN IMMEDIATE`` transaction. Host liveness is a
  wall-clock timestamp (``expires_at = time.time() + ttl``): monotonic clocks
  are per process and cannot be compared across agents, the wall clock is the
  one clock every process on the machine shares (a step of the clock shortens
  or stretches leases by the same amount).
* ``etcd://HOST:PORT[/prefix][?timeout=SECONDS]`` -- an etcd v3 cluster
  (``migrate/store_etcd.py``) through its JSON gateway: host liveness is an
  etcd lease kept alive by :meth:`ClusterStore.keepalive` (server-side time, no
  client clock involved), every compare-and-swap is one etcd transaction
  comparing the ``mod_revision`` of each record it read (and the value of the
  destination's liveness key). Keys under the prefix (default ``/vmigrate``),
  values JSON::

      PREFIX/hosts/NAME       host record (address, info, schedulable, lease id)
      PREFIX/alive/NAME       the host's lease id, attached to that lease:
                              exists only while the lease is alive
      PREFIX/vms/NAME         VM record (owner, spec)
      PREFIX/migrations/VM    the migration in flight for VM (at most one)

Rules both backends follow (the checks live in this module, see ``check_*``):

* Names (hosts, VMs, migration ids) match ``[A-Za-z0-9][A-Za-z0-9._-]*``.
* A VM's owner changes ONLY through a migration, by compare-and-swap:
  ``begin_migration`` (the VM has no pending/committed migration, ``src`` owns
  it, ``dst`` is alive and schedulable; records ``dst``'s lease) ->
  ``commit_migration`` (one transaction: migration pending with that id, owner
  is ``src``, ``dst``'s lease is alive AND is the lease recorded at begin --
  an agent that lost its lease, even if it registered again since, cannot
  claim the guest -> owner=dst, state committed) or ``abort_migration``
  (pending -> aborted). Exactly one of commit and abort wins; both are
  idempotent for the side that won. ``rollback_migration`` (committed -> owner
  back to ``src``, only while the owner is still ``dst``) and
  ``finish_migration`` (deletes a record that is no longer pending).
* Pending and committed migrations block a new ``begin_migration`` of the same
  VM (:class:`MigrationInProgress`) until they are finished; aborted and
  rolled-back ones are simply replaced.
* Re-registering a host is an upsert that keeps its drain flag (a drained host
  that restarts stays drained until it is re-admitted) and gives it a new
  lease, which voids the old one.
* A change that raised StoreUnavailable may or may not have been applied (the
  answer can be lost after etcd applied it): read back, or call it again --
  commit, abort, rollback and finish are idempotent for that reason.
* Timestamps in records (``created_at``, ``updated_at``, ...) are wall-clock
  seconds, for people to read; only SQLite uses the clock for liveness.
"""

from __future__ import annotations

import abc
import enum
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

__all__ = [
    "AlreadyExists",
    "ClusterStore",
    "Conflict",
    "Heartbeat",
    "HostNotFound",
    "HostRecord",
    "HostUnavailable",
    "MigrationInProgress",
    "MigrationNotFound",
    "MigrationRecord",
    "MigrationState",
    "MigrationStateError",
    "NotFound",
    "NotOwner",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailable",
    "VmAlreadyExists",
    "VmNotFound",
    "VmRecord",
    "open_store",
]

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_ETCD_PREFIX = "/vmigrate"


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base class of every error the cluster store raises."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or used right now (down, unreachable, locked too long)."""


class StoreConfigError(StoreError):
    """Bad store URL, missing client library, or a store written by a newer version."""


class NotFound(StoreError):
    """Base class: the named record does not exist."""


class HostNotFound(NotFound):
    pass


class VmNotFound(NotFound):
    pass


class MigrationNotFound(NotFound):
    """No migration with that id is recorded for that VM."""


class AlreadyExists(StoreError):
    """Base class: a record with that name already exists."""


class VmAlreadyExists(AlreadyExists):
    """VM names are unique cluster-wide."""


class Conflict(StoreError):
    """Base class: a precondition of a compare-and-swap does not hold."""


class NotOwner(Conflict):
    """The VM is not owned by the host the caller said."""


class MigrationInProgress(Conflict):
    """The VM already has a pending or committed (not yet finished) migration."""


class MigrationStateError(Conflict):
    """The migration is not in a state that allows this transition."""


class HostUnavailable(Conflict):
    """The host is not alive, its lease changed, it is drained, or it is the source itself."""


# --------------------------------------------------------------------------- records


class MigrationState(enum.StrEnum):
    PENDING = "pending"
    COMMITTED = "committed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True, slots=True)
class HostRecord:
    name: str
    address: str
    info: dict[str, Any]
    schedulable: bool
    alive: bool
    ttl_s: float
    lease: str  # opaque id of the host's current lease; changes at every registration
    registered_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class VmRecord:
    name: str
    owner: str
    spec: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class MigrationRecord:
    vm: str
    migration_id: str
    src: str
    dst: str
    state: MigrationState
    dst_lease: str  # the destination's lease at begin; commit requires it still alive
    created_at: float
    updated_at: float


# --------------------------------------------------------------------------- interface


class ClusterStore(abc.ABC):
    """What every backend implements. All methods are thread-safe."""

    url: str

    # hosts
    @abc.abstractmethod
    def register_host(
        self, name: str, address: str, info: Mapping[str, Any], ttl_s: float
    ) -> HostRecord:
        """Upsert a host and give it a new lease of ``ttl_s`` seconds.

        Keeps an existing host's drain flag; a new host is schedulable.
        """

    @abc.abstractmethod
    def keepalive(self, name: str) -> bool:
        """Renew the host's lease; False when it was lost (expired or replaced).

        After False the host must :meth:`register_host` again, and migrations
        begun towards it under the old lease can no longer commit.
        """

    @abc.abstractmethod
    def get_host(self, name: str) -> HostRecord:
        """Raises HostNotFound."""

    @abc.abstractmethod
    def list_hosts(self) -> list[HostRecord]:
        """Every registered host, alive or not, sorted by name."""

    @abc.abstractmethod
    def set_schedulable(self, name: str, schedulable: bool) -> HostRecord:
        """Drain (False) or re-admit (True) a host: drained hosts receive no migrations."""

    @abc.abstractmethod
    def update_host_info(
        self, name: str, info: Mapping[str, Any], *, replace: bool = False
    ) -> HostRecord:
        """Merge ``info`` into the host's info (top-level keys), or replace it whole."""

    @abc.abstractmethod
    def deregister_host(self, name: str) -> None:
        """Remove the host and revoke its lease. VMs it owns keep their owner field."""

    # VMs
    @abc.abstractmethod
    def create_vm(self, name: str, owner: str, spec: Mapping[str, Any]) -> VmRecord:
        """Raises VmAlreadyExists (names are unique cluster-wide), HostNotFound."""

    @abc.abstractmethod
    def get_vm(self, name: str) -> VmRecord:
        """Raises VmNotFound."""

    @abc.abstractmethod
    def list_vms(self, owner: str | None = None) -> list[VmRecord]:
        """VMs sorted by name, all of them or those of one owner."""

    @abc.abstractmethod
    def update_vm_spec(
        self, name: str, spec: Mapping[str, Any], *, owner: str | None = None
    ) -> VmRecord:
        """Replace the spec; with ``owner``, only if that host owns the VM (NotOwner)."""

    @abc.abstractmethod
    def delete_vm(self, name: str, owner: str) -> None:
        """Delete a VM, only by its owner and not during a pending/committed migration."""

    # migrations
    @abc.abstractmethod
    def begin_migration(self, vm: str, migration_id: str, src: str, dst: str) -> MigrationRecord:
        """Record a pending migration.

        Raises VmNotFound, NotOwner (src does not own vm), MigrationInProgress,
        HostNotFound / HostUnavailable (dst unknown, not alive, drained or == src).
        """

    @abc.abstractmethod
    def commit_migration(self, vm: str, migration_id: str) -> MigrationRecord:
        """Atomically set owner=dst and state committed.

        Requires the migration pending with that id, owner == src, and dst's
        lease (the one recorded at begin) alive. Raises MigrationNotFound,
        MigrationStateError (aborted / rolled back), NotOwner, HostUnavailable.
        Calling it again after it succeeded returns the committed record.
        """

    @abc.abstractmethod
    def abort_migration(self, vm: str, migration_id: str) -> bool:
        """Pending -> aborted: True. False when the commit won (committed or rolled back).

        True again if it was already aborted. Raises MigrationNotFound.
        """

    @abc.abstractmethod
    def rollback_migration(self, vm: str, migration_id: str) -> MigrationRecord:
        """Committed -> owner back to src, state rolled_back; only while owner == dst.

        Raises MigrationNotFound, MigrationStateError (not committed), NotOwner.
        Idempotent once rolled back.
        """

    @abc.abstractmethod
    def finish_migration(self, vm: str, migration_id: str) -> bool:
        """Delete the record; False if there is none with that id.

        Raises MigrationStateError while it is still pending (abort it first).
        """

    @abc.abstractmethod
    def get_migration(self, vm: str) -> MigrationRecord | None:
        """The VM's migration record, or None."""

    @abc.abstractmethod
    def list_migrations(self) -> list[MigrationRecord]:
        """Every migration record, sorted by VM name."""

    # lifecycle
    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. Leases are not revoked (use deregister_host)."""

    def __enter__(self) -> ClusterStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


# --------------------------------------------------------------------------- factory


def open_store(url: str, *, timeout_s: float | None = None) -> ClusterStore:
    """Open the store at ``url``; raises StoreUnavailable (one line) if it cannot be reached.

    ``sqlite:///abs/path.db`` (``sqlite://rel/path.db`` is relative) or
    ``etcd://host:port[/prefix]``. ``?timeout=S`` in the URL, or ``timeout_s``,
    bounds every request (SQLite: the busy timeout), default 5 s.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise StoreConfigError(
            f"bad store URL {url!r}: expected sqlite:///PATH or etcd://HOST:PORT"
        )
    rest, _, query = rest.partition("?")
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    unknown = set(params) - {"timeout"}
    if unknown:
        raise StoreConfigError(f"bad store URL {url!r}: unknown option(s) {sorted(unknown)}")
    if timeout_s is None:
        try:
            timeout_s = float(params["timeout"][-1]) if "timeout" in params else DEFAULT_TIMEOUT_S
        except ValueError:
            raise StoreConfigError(f"bad store URL {url!r}: timeout must be a number of seconds")
    if not timeout_s > 0:
        raise StoreConfigError(f"bad store URL {url!r}: timeout must be > 0")

    if scheme == "sqlite":
        if not rest:
            raise StoreConfigError(f"bad store URL {url!r}: no database path")
        from .store_sqlite import SqliteStore

        return SqliteStore(rest, timeout_s=timeout_s, url=url)
    if scheme == "etcd":
        hostport, _, prefix = rest.partition("/")
        parsed = urllib.parse.urlsplit("//" + hostport)
        try:
            port = parsed.port or 2379
        except ValueError:
            raise StoreConfigError(f"bad store URL {url!r}: bad port")
        if not parsed.hostname:
            raise StoreConfigError(f"bad store URL {url!r}: no host")
        prefix = "/" + prefix.strip("/") if prefix.strip("/") else DEFAULT_ETCD_PREFIX
        from .store_etcd import EtcdStore

        return EtcdStore(parsed.hostname, port, prefix=prefix, timeout_s=timeout_s, url=url)
    raise StoreConfigError(f"bad store URL {url!r}: unknown scheme {scheme!r} (sqlite, etcd)")


# --------------------------------------------------------------------------- helpers
# Shared by the backends so that both enforce exactly the same rules.

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid {kind} name {name!r}: expected [A-Za-z0-9][A-Za-z0-9._-]*")
    return name


def dump_json(kind: str, value: Mapping[str, Any]) -> str:
    """Serialize a user-supplied dict (info, spec) or raise ValueError."""
    try:
        return json.dumps(dict(value), sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{kind} must be JSON-serializable: {e}")


def check_begin(
    vm_name: str,
    vm: VmRecord | None,
    current: MigrationRecord | None,
    src: str,
    dst: str,
    dst_host: HostRecord | None,
) -> None:
    if vm is None:
        raise VmNotFound(f"VM {vm_name} does not exist")
    if current is not None and current.state in (
        MigrationState.PENDING,
        MigrationState.COMMITTED,
    ):
        raise MigrationInProgress(
            f"VM {vm_name} already has migration {current.migration_id} "
            f"({current.src} -> {current.dst}) {current.state}"
        )
    if vm.owner != src:
        raise NotOwner(f"VM {vm_name} is owned by {vm.owner}, not {src}")
    if dst == src:
        raise HostUnavailable(f"cannot migrate VM {vm_name} from {src} to itself")
    if dst_host is None:
        raise HostNotFound(f"destination host {dst} is not registered")
    if not dst_host.alive:
        raise HostUnavailable(f"destination host {dst} is not alive (lease expired)")
    if not dst_host.schedulable:
        raise HostUnavailable(f"destination host {dst} is drained (not schedulable)")


def _check_id(vm_name: str, mig: MigrationRecord | None, migration_id: str) -> MigrationRecord:
    if mig is None or mig.migration_id != migration_id:
        raise MigrationNotFound(f"no migration {migration_id} for VM {vm_name}")
    return mig


def check_commit(
    vm_name: str,
    vm: VmRecord | None,
    mig: MigrationRecord | None,
    migration_id: str,
    dst_alive_lease: str | None,
) -> bool:
    """True: apply the commit; False: it is already committed (no-op). Raises otherwise."""
    mig = _check_id(vm_name, mig, migration_id)
    if vm is None:
        raise VmNotFound(f"VM {vm_name} does not exist")
    if mig.state == MigrationState.COMMITTED and vm.owner == mig.dst:
        return False
    if mig.state != MigrationState.PENDING:
        raise MigrationStateError(f"migration {migration_id} of VM {vm_name} is {mig.state}")
    if vm.owner != mig.src:
        raise NotOwner(f"VM {vm_name} is owned by {vm.owner}, not {mig.src}")
    if dst_alive_lease is None:
        raise HostUnavailable(f"destination host {mig.dst} is not alive (lease expired)")
    if dst_alive_lease != mig.dst_lease:
        raise HostUnavailable(
            f"destination host {mig.dst} lost the lease it had when the migration began"
        )
    return True


def check_abort(vm_name: str, mig: MigrationRecord | None, migration_id: str) -> bool | None:
    """None: apply the abort; True/False: the answer without a change."""
    mig = _check_id(vm_name, mig, migration_id)
    if mig.state == MigrationState.PENDING:
        return None
    return mig.state == MigrationState.ABORTED


def check_rollback(
    vm_name: str, vm: VmRecord | None, mig: MigrationRecord | None, migration_id: str
) -> bool:
    """True: apply the rollback; False: already rolled back. Raises otherwise."""
    mig = _check_id(vm_name, mig, migration_id)
    if mig.state == MigrationState.ROLLED_BACK:
        return False
    if mig.state != MigrationState.COMMITTED:
        raise MigrationStateError(
            f"migration {migration_id} of VM {vm_name} is {mig.state}, not committed"
        )
    if vm is None:
        raise VmNotFound(f"VM {vm_name} does not exist")
    if vm.owner != mig.dst:
        raise NotOwner(f"VM {vm_name} is owned by {vm.owner}, not {mig.dst}: cannot roll back")
    return True


def check_finish(vm_name: str, mig: MigrationRecord | None, migration_id: str) -> bool:
    """True: delete the record; False: there is no such record."""
    if mig is None or mig.migration_id != migration_id:
        return False
    if mig.state == MigrationState.PENDING:
        raise MigrationStateError(
            f"migration {migration_id} of VM {vm_name} is still pending: commit or abort it first"
        )
    return True


def check_delete_vm(
    vm_name: str, vm: VmRecord | None, mig: MigrationRecord | None, owner: str
) -> None:
    if vm is None:
        raise VmNotFound(f"VM {vm_name} does not exist")
    if vm.owner != owner:
        raise NotOwner(f"VM {vm_name} is owned by {vm.owner}, not {owner}")
    if mig is not None and mig.state in (MigrationState.PENDING, MigrationState.COMMITTED):
        raise MigrationInProgress(
            f"VM {vm_name} has migration {mig.migration_id} {mig.state}: finish it first"
        )


def one_line(text: object) -> str:
    """Collapse an error text to one short line."""
    s = " ".join(str(text).split())
    return s if len(s) <= 300 else s[:297] + "..."


# --------------------------------------------------------------------------- heartbeat


class Heartbeat:
    """Keeps one host's lease alive from a daemon thread.

    Calls ``store.keepalive(name)`` every ``interval_s`` (pick about a third of
    the TTL). When the lease is lost it calls ``on_lost(name)`` once and stops;
    while the store is unavailable it keeps trying (the lease may outlive the
    outage; if it does not, the next keepalive says so).
    """

    def __init__(
        self,
        store: ClusterStore,
        name: str,
        interval_s: float,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.interval_s = interval_s
        self.on_lost = on_lost
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{name}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                ok = self.store.keepalive(self.name)
            except StoreUnavailable:
                continue
            if not ok:
                self.lost = True
                if self.on_lost is not None:
                    self.on_lost(self.name)
                return
