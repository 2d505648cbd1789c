"""Who is calling, and may they? Server-side authorization for vmigrate's gRPC services.

The TLS layer (see :mod:`vmigrate.migrate.pki`) already guarantees that every connection to
an agent presents a certificate issued by the cluster CA. This module turns that
certificate into a :class:`PeerIdentity` (role + name, read from the ``vmigrate://`` SAN
URI and cross-checked against the ExtendedKeyUsage) and enforces a per-method
:class:`MethodPolicy` with a server interceptor, so servicer code never has to remember to
check: e.g. only agents may push a migration into an agent, while the CLI may query status.

Usage::

    policy = MethodPolicy(
        {"/vmigrate.Agent/ReceiveMigration": AGENT_ONLY},
        default=ANY_ROLE,  # every other method: agents and clients
    )
    server = grpc.server(pool, interceptors=[AuthzInterceptor(policy)])
    add_server_port(server, "0.0.0.0:7443", agent_cert_paths)

    def Status(self, request, context):
        who = peer_identity(context)  # PeerIdentity(role="client", name="admin")
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import grpc
from cryptography import x509

from .pki import ROLES, PkiError, Role, certificate_identity

logger = logging.getLogger(__name__)

ANY_ROLE: Final[frozenset[Role]] = frozenset(ROLES)
AGENT_ONLY: Final[frozenset[Role]] = frozenset({"agent"})
NOBODY: Final[frozenset[Role]] = frozenset()


class UnauthenticatedPeerError(PkiError):
    """The call carries no verified vmigrate certificate (plaintext, or an unusable cert)."""


class PermissionDeniedError(PkiError):
    """The caller is authenticated but its role may not call this method."""


@dataclass(frozen=True)
class PeerIdentity:
    """The verified identity of the peer of a call."""

    role: Role
    name: str

    def __str__(self) -> str:
        return f"{self.role} {self.name!r}"


class _HasAuthContext(Protocol):
    def auth_context(self) -> Mapping[str, Sequence[bytes]]: ...


@functools.lru_cache(maxsize=256)
def _identity_from_pem(pem: bytes) -> PeerIdentity:
    # Cached: a connection presents the same cert on every call; parsing it each time is waste.
    try:
        cert = x509.load_pem_x509_certificate(pem)
        role, name = certificate_identity(cert)
    except (ValueError, PkiError) as e:
        raise UnauthenticatedPeerError(f"peer certificate carries no usable vmigrate identity: {e}")
    return PeerIdentity(role=role, name=name)


def identity_from_auth_context(auth: Mapping[str, Sequence[bytes]]) -> PeerIdentity:
    """The peer identity in a gRPC auth context; raises :class:`UnauthenticatedPeerError`.

    Reads ``x509_pem_cert`` (the leaf the peer presented, already verified against the
    cluster CA by the TLS handshake) rather than gRPC's flattened SAN list, so the role is
    also checked against the certificate's key usage.
    """
    if list(auth.get("transport_security_type", ())) != [b"ssl"]:
        raise UnauthenticatedPeerError("connection is not TLS-authenticated (plaintext)")
    pems = list(auth.get("x509_pem_cert", ()))
    if len(pems) != 1:
        raise UnauthenticatedPeerError("peer presented no client certificate")
    return _identity_from_pem(bytes(pems[0]))


def peer_identity(context: _HasAuthContext) -> PeerIdentity:
    """Inside a servicer method (sync or asyncio): who is calling, as verified by mTLS."""
    return identity_from_auth_context(context.auth_context())


def _check_roles(roles: Iterable[Role], what: str) -> frozenset[Role]:
    if isinstance(roles, str):
        raise TypeError(f"{what}: pass a set of roles, not the string {roles!r}")
    out = frozenset(roles)
    unknown = out - ANY_ROLE
    if unknown:
        raise ValueError(f"{what}: unknown role(s) {sorted(unknown)}; expected {list(ROLES)}")
    return out


class MethodPolicy:
    """Which roles may call which gRPC method.

    ``rules`` maps full method names (``/package.Service/Method``) or whole services
    (``/package.Service/*``) to the allowed roles; an exact method rule beats a service
    rule. Methods matching no rule get ``default`` -- which has no default value on
    purpose: pass ``NOBODY`` (fail closed) or ``ANY_ROLE`` consciously.
    """

    def __init__(self, rules: Mapping[str, Iterable[Role]], *, default: Iterable[Role]) -> None:
        self._rules: dict[str, frozenset[Role]] = {}
        for method, roles in rules.items():
            service, sep, name = method.removeprefix("/").partition("/")
            if not method.startswith("/") or not sep or not service or not name or "/" in name:
                raise ValueError(
                    f"policy key {method!r}: expected '/pkg.Service/Method' or '/pkg.Service/*'"
                )
            self._rules[method] = _check_roles(roles, f"policy for {method}")
        self._default = _check_roles(default, "policy default")

    def allowed_roles(self, method: str) -> frozenset[Role]:
        """The roles allowed to call ``method`` (may be empty)."""
        if method in self._rules:
            return self._rules[method]
        service = method.rpartition("/")[0]
        return self._rules.get(f"{service}/*", self._default)

    def check(self, method: str, identity: PeerIdentity) -> None:
        """Raise :class:`PermissionDeniedError` unless ``identity`` may call ``method``."""
        allowed = self.allowed_roles(method)
        if identity.role in allowed:
            return
        if not allowed:
            raise PermissionDeniedError(
                f"{method} may not be called by anyone (caller: {identity})"
            )
        raise PermissionDeniedError(
            f"{method} requires role {' or '.join(sorted(allowed))}; caller is {identity}"
        )


def authorize(context: _HasAuthContext, method: str, policy: MethodPolicy) -> PeerIdentity:
    """Identify the caller and check ``policy``; for code that cannot use an interceptor."""
    identity = peer_identity(context)
    policy.check(method, identity)
    return identity


def _is_plaintext(context: _HasAuthContext) -> bool:
    return list(context.auth_context().get("transport_security_type", ())) != [b"ssl"]


def _status_for(err: PkiError) -> grpc.StatusCode:
    if isinstance(err, PermissionDeniedError):
        return grpc.StatusCode.PERMISSION_DENIED
    return grpc.StatusCode.UNAUTHENTICATED


class _Guard:
    """Shared decision logic of the sync and asyncio interceptors."""

    def __init__(self, policy: MethodPolicy, insecure_plaintext: bool) -> None:
        if not isinstance(policy, MethodPolicy):
            raise TypeError(f"policy must be a MethodPolicy, not {type(policy).__name__}")
        self.policy = policy
        # Only an explicit True lets unauthenticated plaintext calls through.
        self.insecure_plaintext = insecure_plaintext is True

    def decide(self, context: _HasAuthContext, method: str) -> PkiError | None:
        """None if the call may proceed, else the error to abort it with."""
        if self.insecure_plaintext and _is_plaintext(context):
            return None
        try:
            authorize(context, method, self.policy)
        except (UnauthenticatedPeerError, PermissionDeniedError) as e:
            logger.warning("denied %s: %s", method, e)
            return e
        return None


_Behavior = Callable[..., Any]


def _rebuild(handler: grpc.RpcMethodHandler, kind: str, behavior: _Behavior) -> Any:
    factory = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }[kind]
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _kind(handler: grpc.RpcMethodHandler) -> str:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if getattr(handler, kind, None) is not None:
            return kind
    raise TypeError(f"RPC method handler without a behavior: {handler!r}")


class AuthzInterceptor(grpc.ServerInterceptor):
    """Sync-server interceptor enforcing a :class:`MethodPolicy` before any servicer code runs.

    Denied calls end with UNAUTHENTICATED (no usable identity) or PERMISSION_DENIED (wrong
    role), with a one-line reason. ``insecure_plaintext=True`` lets calls on plaintext
    connections through unchecked -- for a server deliberately started with
    ``add_server_port(..., insecure_plaintext=True)``; TLS calls are still checked.
    """

    def __init__(self, policy: MethodPolicy, *, insecure_plaintext: bool = False) -> None:
        self._guard = _Guard(policy, insecure_plaintext)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap the method's behavior so the check runs with the call's context."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        kind = _kind(handler)
        inner: _Behavior = getattr(handler, kind)
        guard = self._guard

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            err = guard.decide(context, method)
            if err is not None:
                context.abort(_status_for(err), str(err))  # raises
            return inner(request, context)

        return _rebuild(handler, kind, guarded)


class AioAuthzInterceptor(grpc.aio.ServerInterceptor):
    """:class:`AuthzInterceptor` for ``grpc.aio`` servers (async servicer methods)."""

    def __init__(self, policy: MethodPolicy, *, insecure_plaintext: bool = False) -> None:
        self._guard = _Guard(policy, insecure_plaintext)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap the method's behavior so the check runs with the call's context."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        kind = _kind(handler)
        inner: _Behavior = getattr(handler, kind)
        guard = self._guard

        async def check(context: grpc.aio.ServicerContext) -> None:
            err = guard.decide(context, method)
            if err is not None:
                await context.abort(_status_for(err), str(err))  # raises

        if kind in ("unary_stream", "stream_stream") and not inspect.iscoroutinefunction(inner):
            # Response-streaming behavior written as an (async) generator: stay a generator.
            async def guarded_gen(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                await check(context)
                result = inner(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:
                    sync_iter: Iterator[Any] = iter(result)
                    for item in sync_iter:
                        yield item

            return _rebuild(handler, kind, guarded_gen)

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            result = inner(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result

        return _rebuild(handler, kind, guarded)


__all__ = [
    "AGENT_ONLY",
    "ANY_ROLE",
    "NOBODY",
    "AioAuthzInterceptor",
    "AuthzInterceptor",
    "MethodPolicy",
    "PeerIdentity",
    "PermissionDeniedError",
    "UnauthenticatedPeerError",
    "authorize",
    "identity_from_auth_context",
    "peer_identity",
]
