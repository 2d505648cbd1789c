"""etcd cluster store, through etcd's v3 JSON gateway with the ``etcd3gw`` client.

Key layout under the prefix (default ``/vmigrate``), values JSON (``"v": 1``
is the record format)::

    PREFIX/hosts/NAME       {"name", "address", "info", "schedulable", "ttl_s",
                             "lease", "registered_at", "updated_at"}
    PREFIX/alive/NAME       the host's lease id (decimal), put with that lease:
                            etcd deletes it when the lease expires or is revoked
    PREFIX/vms/NAME         {"name", "owner", "spec", "created_at", "updated_at"}
    PREFIX/migrations/VM    {"vm", "migration_id", "src", "dst", "state",
                             "dst_lease", "created_at", "updated_at"}

A host is alive while ``alive/NAME`` holds the lease named in its record.

Every change is an optimistic compare-and-swap: read the records involved (one
read-only transaction, so they are a consistent snapshot), run the shared
checks of ``store.check_*`` on them, then one transaction that compares the
``mod_revision`` of every record read (0 = must not exist) and writes. If any
compare fails, something changed in between: read again and re-check, which
either raises the specific error or tries again. ``commit_migration``
additionally compares ``alive/DST`` with the lease recorded at begin, so the
ownership change and "the destination's lease is alive" are one atomic step.

Leases are etcd's: TTLs are whole seconds (rounded up, and at least the
server's minimum, which depends on its election timeout); liveness uses the
server's clock only. Every HTTP request is bounded by ``timeout_s``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

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

try:
    import etcd3gw
    import requests
    from etcd3gw import exceptions as etcd_exc
    from etcd3gw.utils import _encode as _b64  # base64 as the gateway wants it
except ImportError:  # pragma: no cover - depends on the environment
    etcd3gw = None  # type: ignore[assignment]

RECORD_FORMAT = 1
MAX_CAS_TRIES = 200

T = TypeVar("T")

# What a compare/op list looks like on the wire (the gateway's JSON).
Json = dict[str, Any]


class _KV(NamedTuple):
    key: str
    value: bytes
    mod_revision: int
    lease: int


def _now() -> float:
    return time.time()  # informational timestamps only


def _put(key: str, value: bytes | str, lease: int | None = None) -> Json:
    op: Json = {"key": _b64(key.encode()), "value": _b64(_to_bytes(value))}
    if lease:
        op["lease"] = str(lease)  # int64: as a string, JSON numbers are doubles
    return {"request_put": op}


def _delete(key: str) -> Json:
    return {"request_delete_range": {"key": _b64(key.encode())}}


def _range(key: str, prefix: bool = False) -> Json:
    op: Json = {"key": _b64(key.encode())}
    if prefix:
        end = bytearray(key.encode())
        end[-1] += 1
        op["range_end"] = _b64(bytes(end))
    return {"request_range": op}


def _same(key: str, kv: _KV | None) -> Json:
    """Compare: the key is unchanged since it was read (mod_revision 0: still absent)."""
    return {
        "key": _b64(key.encode()),
        "target": "MOD",
        "result": "EQUAL",
        "mod_revision": kv.mod_revision if kv else 0,
    }


def _value_is(key: str, value: str) -> Json:
    """Compare: the key exists and holds exactly ``value`` (fails if it is absent)."""
    return {"key": _b64(key.encode()), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}


def _exists(key: str) -> Json:
    return {"key": _b64(key.encode()), "target": "VERSION", "result": "GREATER", "version": 0}


def _to_bytes(v: bytes | str) -> bytes:
    return v if isinstance(v, bytes) else v.encode()


def _json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps({"v": RECORD_FORMAT, **obj}, sort_keys=True, separators=(",", ":")).encode()


def _load(kv: _KV) -> dict[str, Any]:
    d = json.loads(kv.value)
    if d.pop("v", RECORD_FORMAT) > RECORD_FORMAT:
        raise StoreConfigError(f"record {kv.key} was written by a newer vmigrate")
    return d


def _vm(kv: _KV | None) -> VmRecord | None:
    if kv is None:
        return None
    d = _load(kv)
    return VmRecord(d["name"], d["owner"], d["spec"], d["created_at"], d["updated_at"])


def _mig(kv: _KV | None) -> MigrationRecord | None:
    if kv is None:
        return None
    d = _load(kv)
    return MigrationRecord(
        d["vm"],
        d["migration_id"],
        d["src"],
        d["dst"],
        MigrationState(d["state"]),
        d["dst_lease"],
        d["created_at"],
        d["updated_at"],
    )


def _mig_json(m: MigrationRecord) -> bytes:
    return _json(
        {
            "vm": m.vm,
            "migration_id": m.migration_id,
            "src": m.src,
            "dst": m.dst,
            "state": m.state.value,
            "dst_lease": m.dst_lease,
            "created_at": m.created_at,
            "updated_at": m.updated_at,
        }
    )


def _vm_json(v: VmRecord) -> bytes:
    return _json(
        {
            "name": v.name,
            "owner": v.owner,
            "spec": v.spec,
            "created_at": v.created_at,
            "updated_at": v.updated_at,
        }
    )


def _host(kv: _KV | None, alive_kv: _KV | None) -> HostRecord | None:
    if kv is None:
        return None
    d = _load(kv)
    return HostRecord(
        name=d["name"],
        address=d["address"],
        info=d["info"],
        schedulable=d["schedulable"],
        alive=alive_kv is not None and alive_kv.value.decode() == d["lease"],
        ttl_s=d["ttl_s"],
        lease=d["lease"],
        registered_at=d["registered_at"],
        updated_at=d["updated_at"],
    )


def _host_json(h: HostRecord) -> bytes:
    return _json(
        {
            "name": h.name,
            "address": h.address,
            "info": h.info,
            "schedulable": h.schedulable,
            "ttl_s": h.ttl_s,
            "lease": h.lease,
            "registered_at": h.registered_at,
            "updated_at": h.updated_at,
        }
    )


def _replace(rec: T, **changes: Any) -> T:
    return dataclasses.replace(rec, **changes)  # type: ignore[type-var]


# gRPC codes etcd answers with when it cannot serve right now: DEADLINE_EXCEEDED,
# RESOURCE_EXHAUSTED (e.g. space quota), UNAVAILABLE (no leader, timeouts).
_UNAVAILABLE_CODES = {4, 8, 14}
_ERRNO_RE = re.compile(r"\[Errno -?\d+\] [^'\")\]]+")


class EtcdStore(ClusterStore):
    def __init__(
        self,
        host: str,
        port: int = 2379,
        *,
        prefix: str = "/vmigrate",
        timeout_s: float = 5.0,
        url: str | None = None,
    ) -> None:
        if etcd3gw is None:
            raise StoreConfigError(
                "the etcd store needs the etcd3gw package: pip install etcd3gw "
                "(scripts/setup.d/etcd.sh installs it)"
            )
        self.host = host
        self.port = port
        self.prefix = "/" + prefix.strip("/")
        self.timeout_s = timeout_s
        self.url = url or f"etcd://{host}:{port}{self.prefix}"
        self._endpoint = f"http://{host}:{port}"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: dict[threading.Thread, etcd3gw.Etcd3Client] = {}
        self._api_path: str | None = None
        self._leases: dict[str, int] = {}  # host -> lease this store registered
        self._closed = False
        self._probe()

    # ------------------------------------------------------------------ plumbing

    def _k(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}/{kind}/{name}"

    def _error(self, e: BaseException) -> StoreError:
        """Map a client error to StoreUnavailable (cannot reach / no quorum /
        overloaded) or, for anything else etcd refused, a plain StoreError."""
        detail = getattr(e, "detail_text", None) or ""
        text = str(e) or str(detail)  # etcd3gw: str(e) is the HTTP reason or the cause
        code = None
        try:
            body = json.loads(detail)
            code, text = body.get("code"), body.get("message") or body.get("error") or text
        except (TypeError, ValueError, AttributeError):
            pass
        if isinstance(e, etcd_exc.ConnectionTimeoutError) or (
            "timed out" in text.lower() and not _ERRNO_RE.search(text)
        ):
            why = f"no answer within {self.timeout_s:g}s"
        else:
            m = _ERRNO_RE.search(text)
            why = m.group(0).strip() if m else one_line(text) or type(e).__name__
        unavailable = (
            isinstance(
                e,
                etcd_exc.ConnectionFailedError
                | etcd_exc.ConnectionTimeoutError
                | etcd_exc.InternalServerError
                | requests.RequestException
                | ValueError,  # a reply that is not JSON: not etcd, or cut short
            )
            or code in _UNAVAILABLE_CODES
        )
        if unavailable:
            return StoreUnavailable(f"etcd store at {self._endpoint} unavailable: {why}")
        return StoreError(f"etcd store at {self._endpoint} refused the request: {why}")

    def _client(self) -> etcd3gw.Etcd3Client:
        c: etcd3gw.Etcd3Client | None = getattr(self._local, "client", None)
        if c is not None:
            return c
        if self._closed:
            raise StoreError(f"{self.url}: store is closed")
        session = requests.Session()
        session.trust_env = False  # never send cluster traffic through an HTTP proxy
        c = etcd3gw.client(
            host=self.host,
            port=self.port,
            timeout=self.timeout_s,
            api_path=self._api_path,
            session=session,
        )
        self._local.client = c
        with self._lock:  # forget (and close) the sessions of threads that ended
            stale = [self._clients.pop(t) for t in list(self._clients) if not t.is_alive()]
            self._clients[threading.current_thread()] = c
        for old in stale:
            old.session.close()
        return c

    def _call(self, fn: Callable[[etcd3gw.Etcd3Client], T]) -> T:
        try:
            return fn(self._client())
        except (etcd_exc.Etcd3Exception, requests.RequestException, ValueError) as e:
            raise self._error(e)

    def _probe(self) -> None:
        def probe(c: etcd3gw.Etcd3Client) -> None:
            self._api_path = c.api_path  # GET /version: is it etcd?
            c.get(self._k("hosts"), count_only=True)  # a linearizable read: has a leader

        try:
            self._call(probe)
        except StoreUnavailable:
            raise
        except StoreError as e:  # e.g. an HTTP server that is not etcd
            raise StoreUnavailable(
                f"etcd store at {self._endpoint} unavailable: not an etcd v3 endpoint? "
                f"({str(e).split(': ', 1)[-1]})"
            )

    def _txn(self, compare: list[Json], success: list[Json]) -> Json:
        txn = {"compare": compare, "success": success, "failure": []}
        return self._call(lambda c: c.transaction(txn))

    def _read(self, *ops: Json) -> list[list[_KV]]:
        """Several ranges in one read-only transaction: one consistent snapshot."""
        resp = self._txn([], list(ops))
        out = []
        for r in resp.get("responses", []):
            kvs = r.get("response_range", {}).get("kvs", [])
            out.append(
                [
                    _KV(
                        key=etcd3gw.utils._decode(kv["key"]).decode(),
                        value=etcd3gw.utils._decode(kv.get("value", "")),
                        mod_revision=int(kv.get("mod_revision", 0)),
                        lease=int(kv.get("lease", 0)),
                    )
                    for kv in kvs
                ]
            )
        return out

    def _get(self, *keys: str) -> list[_KV | None]:
        return [kvs[0] if kvs else None for kvs in self._read(*(_range(k) for k in keys))]

    def _cas(self, attempt: Callable[[], tuple[list[Json], list[Json], T]]) -> T:
        """Run ``attempt`` (read + check, returns compares, ops, result) until its
        transaction succeeds; no ops means nothing to write."""
        for i in range(MAX_CAS_TRIES):
            compare, ops, result = attempt()
            if not ops or self._txn(compare, ops).get("succeeded", False):
                return result
            if i >= 3:
                time.sleep(random.uniform(0, 0.002 * min(i, 20)))
        raise StoreUnavailable(
            f"etcd store at {self._endpoint} unavailable: too much contention "
            f"({MAX_CAS_TRIES} compare-and-swap attempts failed)"
        )

    def _grant(self, ttl: int) -> tuple[int, int]:
        resp = self._call(lambda c: c.post(c.get_url("/lease/grant"), json={"TTL": ttl, "ID": 0}))
        return int(resp["ID"]), int(resp.get("TTL", ttl))

    def _revoke(self, lease_id: int) -> None:
        try:
            self._call(lambda c: etcd3gw.Lease(lease_id, c).revoke())
        except StoreError:
            pass  # best effort: it expires on its own (also "lease not found")

    # ------------------------------------------------------------------ hosts

    def register_host(
        self, name: str, address: str, info: Mapping[str, Any], ttl_s: float
    ) -> HostRecord:
        check_name("host", name)
        dump_json("info", info)
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        lease_id, granted = self._grant(max(1, math.ceil(ttl_s)))
        hk, ak = self._k("hosts", name), self._k("alive", name)
        old_leases: list[str] = []

        def attempt() -> tuple[list[Json], list[Json], HostRecord]:
            kv, akv = self._get(hk, ak)
            old = _host(kv, akv)
            now = _now()
            rec = HostRecord(
                name=name,
                address=address,
                info=dict(info),
                schedulable=old.schedulable if old else True,
                alive=True,
                ttl_s=float(granted),
                lease=str(lease_id),
                registered_at=old.registered_at if old else now,
                updated_at=now,
            )
            old_leases[:] = [old.lease] if old else []
            return (
                [_same(hk, kv)],
                [_put(hk, _host_json(rec)), _put(ak, str(lease_id), lease=lease_id)],
                rec,
            )

        try:
            rec = self._cas(attempt)
        except BaseException:
            self._revoke(lease_id)
            raise
        for old_lease in old_leases:
            if old_lease != str(lease_id):
                self._revoke(int(old_lease))
        with self._lock:
            self._leases[name] = lease_id
        return rec

    def keepalive(self, name: str) -> bool:
        with self._lock:
            lease_id = self._leases.get(name)
        kv, akv = self._get(self._k("hosts", name), self._k("alive", name))
        host = _host(kv, akv)
        ok = host is not None and host.alive and (lease_id is None or host.lease == str(lease_id))
        if ok:
            assert host is not None
            ttl = self._call(lambda c: etcd3gw.Lease(int(host.lease), c).refresh())
            ok = ttl > 0
        if not ok:
            with self._lock:
                if self._leases.get(name) == lease_id:
                    self._leases.pop(name, None)
        return ok

    def get_host(self, name: str) -> HostRecord:
        host = _host(*self._get(self._k("hosts", name), self._k("alive", name)))
        if host is None:
            raise HostNotFound(f"host {name} is not registered")
        return host

    def list_hosts(self) -> list[HostRecord]:
        hosts, alive = self._read(_range(self._k("hosts"), True), _range(self._k("alive"), True))
        alive_by_key = {kv.key.rsplit("/", 1)[1]: kv for kv in alive}
        out = []
        for kv in hosts:
            rec = _host(kv, alive_by_key.get(kv.key.rsplit("/", 1)[1]))
            assert rec is not None
            out.append(rec)
        return sorted(out, key=lambda h: h.name)

    def _update_host(self, name: str, change: Callable[[HostRecord], HostRecord]) -> HostRecord:
        hk, ak = self._k("hosts", name), self._k("alive", name)

        def attempt() -> tuple[list[Json], list[Json], HostRecord]:
            kv, akv = self._get(hk, ak)
            host = _host(kv, akv)
            if host is None:
                raise HostNotFound(f"host {name} is not registered")
            new = _replace(change(host), updated_at=_now())
            return [_same(hk, kv)], [_put(hk, _host_json(new))], new

        return self._cas(attempt)

    def set_schedulable(self, name: str, schedulable: bool) -> HostRecord:
        return self._update_host(name, lambda h: _replace(h, schedulable=bool(schedulable)))

    def update_host_info(
        self, name: str, info: Mapping[str, Any], *, replace: bool = False
    ) -> HostRecord:
        dump_json("info", info)
        return self._update_host(
            name, lambda h: _replace(h, info=dict(info) if replace else {**h.info, **info})
        )

    def deregister_host(self, name: str) -> None:
        hk, ak = self._k("hosts", name), self._k("alive", name)

        def attempt() -> tuple[list[Json], list[Json], HostRecord]:
            kv, akv = self._get(hk, ak)
            host = _host(kv, akv)
            if host is None:
                raise HostNotFound(f"host {name} is not registered")
            return [_same(hk, kv)], [_delete(hk), _delete(ak)], host

        host = self._cas(attempt)
        self._revoke(int(host.lease))
        with self._lock:
            self._leases.pop(name, None)

    # ------------------------------------------------------------------ VMs

    def create_vm(self, name: str, owner: str, spec: Mapping[str, Any]) -> VmRecord:
        check_name("VM", name)
        dump_json("spec", spec)
        vk, hk, mk = self._k("vms", name), self._k("hosts", owner), self._k("migrations", name)

        def attempt() -> tuple[list[Json], list[Json], VmRecord]:
            vkv, hkv = self._get(vk, hk)
            if vkv is not None:
                raise VmAlreadyExists(f"VM {name} already exists")
            if hkv is None:
                raise HostNotFound(f"owner host {owner} is not registered")
            now = _now()
            rec = VmRecord(name, owner, json.loads(dump_json("spec", spec)), now, now)
            return [_same(vk, None), _exists(hk)], [_put(vk, _vm_json(rec)), _delete(mk)], rec

        return self._cas(attempt)

    def get_vm(self, name: str) -> VmRecord:
        vm = _vm(self._get(self._k("vms", name))[0])
        if vm is None:
            raise VmNotFound(f"VM {name} does not exist")
        return vm

    def list_vms(self, owner: str | None = None) -> list[VmRecord]:
        (kvs,) = self._read(_range(self._k("vms"), True))
        vms = [v for v in map(_vm, kvs) if v is not None]
        return sorted((v for v in vms if owner is None or v.owner == owner), key=lambda v: v.name)

    def update_vm_spec(
        self, name: str, spec: Mapping[str, Any], *, owner: str | None = None
    ) -> VmRecord:
        spec_obj = json.loads(dump_json("spec", spec))
        vk = self._k("vms", name)

        def attempt() -> tuple[list[Json], list[Json], VmRecord]:
            (vkv,) = self._get(vk)
            vm = _vm(vkv)
            if vm is None:
                raise VmNotFound(f"VM {name} does not exist")
            if owner is not None and vm.owner != owner:
                raise NotOwner(f"VM {name} is owned by {vm.owner}, not {owner}")
            new = _replace(vm, spec=spec_obj, updated_at=_now())
            return [_same(vk, vkv)], [_put(vk, _vm_json(new))], new

        return self._cas(attempt)

    def delete_vm(self, name: str, owner: str) -> None:
        vk, mk = self._k("vms", name), self._k("migrations", name)

        def attempt() -> tuple[list[Json], list[Json], None]:
            vkv, mkv = self._get(vk, mk)
            check_delete_vm(name, _vm(vkv), _mig(mkv), owner)
            return [_same(vk, vkv), _same(mk, mkv)], [_delete(vk), _delete(mk)], None

        self._cas(attempt)

    # ------------------------------------------------------------------ migrations

    def begin_migration(self, vm: str, migration_id: str, src: str, dst: str) -> MigrationRecord:
        check_name("migration", migration_id)
        vk, mk = self._k("vms", vm), self._k("migrations", vm)
        hk, ak = self._k("hosts", dst), self._k("alive", dst)

        def attempt() -> tuple[list[Json], list[Json], MigrationRecord]:
            vkv, mkv, hkv, akv = self._get(vk, mk, hk, ak)
            dst_host = _host(hkv, akv)
            check_begin(vm, _vm(vkv), _mig(mkv), src, dst, dst_host)
            assert dst_host is not None
            now = _now()
            rec = MigrationRecord(
                vm, migration_id, src, dst, MigrationState.PENDING, dst_host.lease, now, now
            )
            return (
                [_same(vk, vkv), _same(mk, mkv), _same(hk, hkv), _value_is(ak, dst_host.lease)],
                [_put(mk, _mig_json(rec))],
                rec,
            )

        return self._cas(attempt)

    def commit_migration(self, vm: str, migration_id: str) -> MigrationRecord:
        vk, mk = self._k("vms", vm), self._k("migrations", vm)
        first = [True]

        def attempt() -> tuple[list[Json], list[Json], MigrationRecord]:
            vkv, mkv = self._get(vk, mk)
            mig, vmrec = _mig(mkv), _vm(vkv)
            # Optimistically assume the destination's lease is alive: the
            # transaction compares it. Only after a failed transaction read it,
            # to raise HostUnavailable if that is why.
            alive = mig.dst_lease if mig else None
            if mig and not first[0]:
                (akv,) = self._get(self._k("alive", mig.dst))
                alive = akv.value.decode() if akv else None
            first[0] = False
            if not check_commit(vm, vmrec, mig, migration_id, alive):
                assert mig is not None
                return [], [], mig
            assert mig is not None and vmrec is not None
            now = _now()
            new_vm = _replace(vmrec, owner=mig.dst, updated_at=now)
            new_mig = _replace(mig, state=MigrationState.COMMITTED, updated_at=now)
            return (
                [_same(vk, vkv), _same(mk, mkv), _value_is(self._k("alive", mig.dst), alive or "")],
                [_put(vk, _vm_json(new_vm)), _put(mk, _mig_json(new_mig))],
                new_mig,
            )

        return self._cas(attempt)

    def abort_migration(self, vm: str, migration_id: str) -> bool:
        mk = self._k("migrations", vm)

        def attempt() -> tuple[list[Json], list[Json], bool]:
            (mkv,) = self._get(mk)
            mig = _mig(mkv)
            answer = check_abort(vm, mig, migration_id)
            if answer is not None:
                return [], [], answer
            assert mig is not None
            new = _replace(mig, state=MigrationState.ABORTED, updated_at=_now())
            return [_same(mk, mkv)], [_put(mk, _mig_json(new))], True

        return self._cas(attempt)

    def rollback_migration(self, vm: str, migration_id: str) -> MigrationRecord:
        vk, mk = self._k("vms", vm), self._k("migrations", vm)

        def attempt() -> tuple[list[Json], list[Json], MigrationRecord]:
            vkv, mkv = self._get(vk, mk)
            mig, vmrec = _mig(mkv), _vm(vkv)
            apply = check_rollback(vm, vmrec, mig, migration_id)
            assert mig is not None
            if not apply:
                return [], [], mig
            assert vmrec is not None
            now = _now()
            new_vm = _replace(vmrec, owner=mig.src, updated_at=now)
            new_mig = _replace(mig, state=MigrationState.ROLLED_BACK, updated_at=now)
            return (
                [_same(vk, vkv), _same(mk, mkv)],
                [_put(vk, _vm_json(new_vm)), _put(mk, _mig_json(new_mig))],
                new_mig,
            )

        return self._cas(attempt)

    def finish_migration(self, vm: str, migration_id: str) -> bool:
        mk = self._k("migrations", vm)

        def attempt() -> tuple[list[Json], list[Json], bool]:
            (mkv,) = self._get(mk)
            if not check_finish(vm, _mig(mkv), migration_id):
                return [], [], False
            return [_same(mk, mkv)], [_delete(mk)], True

        return self._cas(attempt)

    def get_migration(self, vm: str) -> MigrationRecord | None:
        return _mig(self._get(self._k("migrations", vm))[0])

    def list_migrations(self) -> list[MigrationRecord]:
        (kvs,) = self._read(_range(self._k("migrations"), True))
        migs = [m for m in map(_mig, kvs) if m is not None]
        return sorted(migs, key=lambda m: m.vm)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.session.close()
        self._local = threading.local()
