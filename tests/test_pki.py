"""Tests for the cluster PKI (vmigrate.migrate.pki) and gRPC authorization (.authz).

The transport tests run a REAL gRPC server on 127.0.0.1 with generic (proto-less) byte
handlers, so what is checked is what BoringSSL inside grpcio actually accepts or refuses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import stat
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmigrate.migrate import authz, pki
from vmigrate.migrate.authz import (
    AGENT_ONLY,
    ANY_ROLE,
    NOBODY,
    AioAuthzInterceptor,
    AuthzInterceptor,
    MethodPolicy,
    PeerIdentity,
    PermissionDeniedError,
    UnauthenticatedPeerError,
)
from vmigrate.migrate.pki import CertPaths

SERVICE = "vmigrate.test.Agent"
PUSH = f"/{SERVICE}/PushMigration"  # unary, agent only
PUSH_PAGES = f"/{SERVICE}/PushPages"  # stream-stream, agent only
STATUS = f"/{SERVICE}/Status"  # agent or client
WHOAMI = f"/{SERVICE}/WhoAmI"  # agent or client; answers "<role>/<name>"
POLICY = MethodPolicy({PUSH: AGENT_ONLY, PUSH_PAGES: AGENT_ONLY}, default=ANY_ROLE)
TIMEOUT = 10.0


# --------------------------------------------------------------------------- fixtures


@dataclass
class Pki:
    ca_dir: Path
    certs: Path
    agent1: CertPaths  # hosts 127.0.0.1, ::1, localhost
    agent2: CertPaths  # hosts host2.example only
    client: CertPaths
    expired_client: CertPaths
    other_ca_dir: Path
    other_client: CertPaths  # "client admin", but from another CA


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca_dir, certs = base / "ca", base / "certs"
    pki.create_ca(ca_dir, "test-cluster")
    agent1 = pki.issue_certificate(
        ca_dir, "agent", "host1", certs, ["127.0.0.1", "::1", "localhost"]
    )
    agent2 = pki.issue_certificate(ca_dir, "agent", "host2", certs, ["host2.example"])
    client = pki.issue_certificate(ca_dir, "client", "admin", certs, [])
    expired = pki.issue_certificate(
        ca_dir, "client", "old", certs, [], 1, valid_from=datetime.now(UTC) - timedelta(days=3)
    )
    other_ca_dir = base / "other-ca"
    pki.create_ca(other_ca_dir, "test-cluster")  # same cluster name, different key
    other_client = pki.issue_certificate(other_ca_dir, "client", "admin", base / "other", [])
    return Pki(ca_dir, certs, agent1, agent2, client, expired, other_ca_dir, other_client)


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    who = authz.peer_identity(context)
    return f"{who.role}/{who.name}".encode()


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _pages(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for r in requests:
        yield r.upper()


HANDLER = grpc.method_handlers_generic_handler(
    SERVICE,
    {
        "PushMigration": grpc.unary_unary_rpc_method_handler(_echo),
        "PushPages": grpc.stream_stream_rpc_method_handler(_pages),
        "Status": grpc.unary_unary_rpc_method_handler(_echo),
        "WhoAmI": grpc.unary_unary_rpc_method_handler(_whoami),
    },
)


@pytest.fixture
def serve() -> Iterator:
    """Start servers on 127.0.0.1:<ephemeral>; returns the port. Stopped after the test."""
    servers: list[grpc.Server] = []

    def start(
        paths: CertPaths | None = None,
        *,
        creds: grpc.ServerCredentials | None = None,
        interceptor: grpc.ServerInterceptor | None = None,
        insecure_plaintext: bool = False,
        address: str = "127.0.0.1:0",
    ) -> int:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            handlers=[HANDLER],
            interceptors=[interceptor or AuthzInterceptor(POLICY)],
        )
        if creds is not None:
            port = server.add_secure_port(address, creds)
        else:
            port = pki.add_server_port(
                server, address, paths, insecure_plaintext=insecure_plaintext
            )
        server.start()
        servers.append(server)
        return port

    yield start
    for s in servers:
        s.stop(None)


@pytest.fixture
def agent_port(tls: Pki, serve) -> int:
    return serve(tls.agent1)


def _call(channel: grpc.Channel, method: str = WHOAMI, payload: bytes = b"ping") -> bytes:
    return channel.unary_unary(method)(payload, timeout=TIMEOUT)


def _refused(channel: grpc.Channel, method: str = WHOAMI) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        _call(channel, method)
    return ei.value


def _raw_creds(ca: Path, cert: Path | None = None, key: Path | None = None):
    """Credentials built straight from files, bypassing pki's own checks."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def _forge(tls: Pki, sans: list[x509.GeneralName], ekus: list[x509.ObjectIdentifier]):
    """Sign an arbitrary leaf with the cluster CA key (what a buggy issuer could produce)."""
    ca_cert = x509.load_pem_x509_certificate((tls.ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((tls.ca_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert, key_pem


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg
    return msg


# --------------------------------------------------------------------------- PKI files


def test_create_ca_writes_private_key_0600_atomically(tmp_path: Path) -> None:
    paths = pki.create_ca(tmp_path / "ca", "prod-eu1")
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.cert.stat().st_mode) == 0o644
    assert stat.S_IMODE(paths.key.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in paths.key.parent.iterdir()) == ["ca.crt", "ca.key"]  # no temps
    ca = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "prod-eu1"


def test_create_ca_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    first = pki.create_ca(ca_dir, "c1")
    old_cert = first.cert.read_bytes()
    with pytest.raises(pki.CaExistsError) as ei:
        pki.create_ca(ca_dir, "c1")
    assert "force" in _one_line(ei.value)
    assert first.cert.read_bytes() == old_cert

    # A half-written CA (key only) is refused as well.
    half = tmp_path / "half"
    half.mkdir()
    (half / "ca.key").write_bytes(b"x")
    with pytest.raises(pki.CaExistsError):
        pki.create_ca(half, "c1")

    leaf = pki.issue_certificate(ca_dir, "client", "admin", tmp_path / "out", [])
    pki.create_ca(ca_dir, "c1", force=True)
    assert first.cert.read_bytes() != old_cert
    assert stat.S_IMODE(first.key.stat().st_mode) == 0o600
    # The old leaf is no longer trusted by the new CA.
    with pytest.raises(pki.UntrustedCertificateError) as ei2:
        pki.verify_cert_paths(CertPaths(leaf.cert, leaf.key, first.cert))
    assert "not issued by" in _one_line(ei2.value)


def test_issued_certificates_carry_role_unambiguously(tls: Pki) -> None:
    agent = x509.load_pem_x509_certificate(tls.agent1.cert.read_bytes())
    san = agent.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["vmigrate://agent/host1"]
    assert set(san.get_values_for_type(x509.DNSName)) == {
        "host1.agent.vmigrate.invalid",
        "localhost",
    }
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = agent.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    client = x509.load_pem_x509_certificate(tls.client.cert.read_bytes())
    csan = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(csan) == [x509.UniformResourceIdentifier("vmigrate://client/admin")]
    ceku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(ceku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    info = pki.verify_cert_paths(tls.agent1, role="agent")
    assert (info.role, info.name, info.cluster) == ("agent", "host1", "test-cluster")
    assert set(info.hosts) == {"127.0.0.1", "::1", "localhost"}
    assert stat.S_IMODE(tls.agent1.key.stat().st_mode) == 0o600
    assert tls.agent1.ca_cert.read_bytes() == (tls.ca_dir / "ca.crt").read_bytes()
    assert pki.verify_cert_paths(tls.client).role == "client"


def test_forged_role_is_rejected_by_eku_cross_check(tls: Pki) -> None:
    """A cert whose URI says agent but whose key usage says client is not an agent."""
    uri = x509.UniformResourceIdentifier("vmigrate://agent/x")
    forged, _ = _forge(tls, [uri], [ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(pki.WrongRoleError):
        pki.certificate_identity(forged)
    pem = forged.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(UnauthenticatedPeerError):
        authz.identity_from_auth_context(
            {"transport_security_type": [b"ssl"], "x509_pem_cert": [pem]}
        )


@pytest.mark.parametrize(
    ("role", "name", "hosts"),
    [
        ("agent", "Host1", []),  # uppercase
        ("agent", "a/b", []),
        ("agent", "", []),
        ("agent", "x" * 64, []),
        ("client", "admin", ["10.0.0.1"]),  # clients have no hosts
        ("agent", "h", ["*.example.com"]),
        ("agent", "h", ["evil.agent.vmigrate.invalid"]),  # reserved pin suffix
        ("agent", "h", "10.0.0.1"),  # a str, not a list
    ],
)
def test_issue_rejects_bad_names(tls: Pki, tmp_path: Path, role, name, hosts) -> None:
    with pytest.raises(pki.InvalidNameError) as ei:
        pki.issue_certificate(tls.ca_dir, role, name, tmp_path, hosts)
    _one_line(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_issue_rejects_unknown_role_and_too_long_validity(tls: Pki, tmp_path: Path) -> None:
    with pytest.raises(pki.WrongRoleError):
        pki.issue_certificate(tls.ca_dir, "admin", "x", tmp_path, [])  # type: ignore[arg-type]
    with pytest.raises(pki.PkiError, match="outlive the CA"):
        pki.issue_certificate(tls.ca_dir, "client", "x", tmp_path, [], 100 * 365)


def test_issue_refuses_to_overwrite_unless_forced(tls: Pki, tmp_path: Path) -> None:
    first = pki.issue_certificate(tls.ca_dir, "agent", "h9", tmp_path, ["10.1.2.3"])
    old = first.cert.read_bytes()
    with pytest.raises(pki.PkiFileExistsError):
        pki.issue_certificate(tls.ca_dir, "agent", "h9", tmp_path, ["10.1.2.3"])
    renewed = pki.issue_certificate(tls.ca_dir, "agent", "h9", tmp_path, ["10.1.2.3"], force=True)
    assert renewed == first and renewed.cert.read_bytes() != old
    pki.verify_cert_paths(renewed, role="agent")
    # A directory holding another CA's ca.crt is not silently switched over.
    with pytest.raises(pki.PkiFileExistsError, match="different CA"):
        pki.issue_certificate(tls.other_ca_dir, "client", "bob", tmp_path, [])


def test_load_errors_are_specific_and_one_line(tls: Pki, tmp_path: Path) -> None:
    missing = CertPaths(tmp_path / "nope.crt", tls.client.key, tls.client.ca_cert)
    with pytest.raises(pki.PkiFileMissingError) as e1:
        pki.channel_credentials(missing)
    assert isinstance(e1.value, FileNotFoundError)
    assert "nope.crt" in _one_line(e1.value)

    mismatched = CertPaths(tls.agent1.cert, tls.client.key, tls.client.ca_cert)
    with pytest.raises(pki.KeyMismatchError) as e2:
        pki.server_credentials(mismatched)
    _one_line(e2.value)

    foreign = CertPaths(tls.other_client.cert, tls.other_client.key, tls.client.ca_cert)
    with pytest.raises(pki.UntrustedCertificateError) as e3:
        pki.channel_credentials(foreign)
    _one_line(e3.value)

    with pytest.raises(pki.CertificateExpiredError) as e4:
        pki.channel_credentials(tls.expired_client)
    assert "expired" in _one_line(e4.value)

    with pytest.raises(pki.WrongRoleError) as e5:
        pki.server_credentials(tls.client)  # a client cert cannot serve
    assert "agent" in _one_line(e5.value)
    with pytest.raises(pki.WrongRoleError):
        pki.channel_credentials(tls.agent1, role="client")

    future = pki.issue_certificate(
        tls.ca_dir, "client", "future", tmp_path, [], valid_from=datetime.now(UTC) + timedelta(1)
    )
    with pytest.raises(pki.CertificateNotYetValidError):
        pki.verify_cert_paths(future)

    garbage = tmp_path / "garbage.crt"
    garbage.write_text("hello")
    with pytest.raises(pki.InvalidCertificateError):
        pki.verify_cert_paths(CertPaths(garbage, tls.client.key, tls.client.ca_cert))


# --------------------------------------------------------------------------- real gRPC


def test_mtls_call_succeeds_and_server_sees_identity(tls: Pki, agent_port: int) -> None:
    target = f"127.0.0.1:{agent_port}"
    with pki.connect(target, tls.client, role="client") as ch:
        assert _call(ch) == b"client/admin"
        assert _call(ch, STATUS, b"hello") == b"hello"
    with pki.connect(target, tls.agent2, role="agent") as ch:  # agent cert as a client cert
        assert _call(ch) == b"agent/host2"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "ipv4:127.0.0.1", "dns:///127.0.0.1"])
def test_connect_by_ip_or_dns_name_in_sans(tls: Pki, agent_port: int, host: str) -> None:
    with pki.connect(f"{host}:{agent_port}", tls.client) as ch:
        assert _call(ch) == b"client/admin"


def test_connect_over_ipv6_literal(tls: Pki, serve) -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    port = serve(tls.agent1, address="[::1]:0")
    with pki.connect(f"[::1]:{port}", tls.client) as ch:
        assert _call(ch) == b"client/admin"


def test_server_name_must_match_sans_unless_agent_is_pinned(tls: Pki, serve) -> None:
    port = serve(tls.agent2)  # SANs: host2.example + host2 pin; not 127.0.0.1
    target = f"127.0.0.1:{port}"
    with pki.connect(target, tls.client) as ch:
        assert _refused(ch).code() == grpc.StatusCode.UNAVAILABLE
    with pki.connect(target, tls.client, agent_name="host2") as ch:
        assert _call(ch) == b"client/admin"
    with pki.connect(target, tls.client, agent_name="host1") as ch:  # wrong agent answered
        assert _refused(ch).code() == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_is_refused(tls: Pki, agent_port: int) -> None:
    creds = _raw_creds(tls.client.ca_cert)  # trusts the CA but presents no cert
    with grpc.secure_channel(f"127.0.0.1:{agent_port}", creds) as ch:
        assert _refused(ch).code() == grpc.StatusCode.UNAVAILABLE


def test_client_from_another_ca_is_refused(tls: Pki, agent_port: int) -> None:
    # Trusts our CA (so only the server's check can fail) but holds another CA's cert.
    creds = _raw_creds(tls.client.ca_cert, tls.other_client.cert, tls.other_client.key)
    with grpc.secure_channel(f"127.0.0.1:{agent_port}", creds) as ch:
        assert _refused(ch).code() == grpc.StatusCode.UNAVAILABLE
    # And a client of the other cluster does not trust our agent either.
    with pki.connect(f"127.0.0.1:{agent_port}", tls.other_client) as ch:
        assert _refused(ch).code() == grpc.StatusCode.UNAVAILABLE


def test_expired_certificate_is_refused_by_server(tls: Pki, agent_port: int) -> None:
    control = _raw_creds(tls.client.ca_cert, tls.client.cert, tls.client.key)
    with grpc.secure_channel(f"127.0.0.1:{agent_port}", control) as ch:
        assert _call(ch) == b"client/admin"  # the raw path works with a valid cert
    creds = _raw_creds(tls.client.ca_cert, tls.expired_client.cert, tls.expired_client.key)
    with grpc.secure_channel(f"127.0.0.1:{agent_port}", creds) as ch:
        assert _refused(ch).code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("role", ["agent", "client"])
def test_only_server_auth_usage_can_serve(tls: Pki, serve, role: str) -> None:
    """TLS itself refuses a clientAuth-only cert as server cert, even if the name matches."""
    ip = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    uri = x509.UniformResourceIdentifier(f"vmigrate://{role}/x")
    ekus = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "agent":
        ekus.append(ExtendedKeyUsageOID.SERVER_AUTH)
    cert, key_pem = _forge(tls, [uri, ip], ekus)
    creds = grpc.ssl_server_credentials(
        [(key_pem, cert.public_bytes(serialization.Encoding.PEM))],
        root_certificates=tls.client.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = serve(creds=creds)
    with pki.connect(f"127.0.0.1:{port}", tls.agent2) as ch:
        if role == "agent":
            assert _call(ch) == b"agent/host2"
        else:
            assert _refused(ch).code() == grpc.StatusCode.UNAVAILABLE


def test_agent_only_method_refuses_client_role(tls: Pki, agent_port: int) -> None:
    target = f"127.0.0.1:{agent_port}"
    with pki.connect(target, tls.client) as ch:
        err = _refused(ch, PUSH)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.details() == f"{PUSH} requires role agent; caller is client 'admin'"
        with pytest.raises(grpc.RpcError) as ei:
            list(ch.stream_stream(PUSH_PAGES)(iter([b"a"]), timeout=TIMEOUT))
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pki.connect(target, tls.agent2) as ch:
        assert _call(ch, PUSH, b"vm") == b"vm"
        pages = ch.stream_stream(PUSH_PAGES)(iter([b"a", b"b"]), timeout=TIMEOUT)
        assert list(pages) == [b"A", b"B"]


def test_plaintext_only_when_explicitly_requested(tls: Pki, serve) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    with pytest.raises(pki.InsecureTransportError):
        pki.add_server_port(server, "127.0.0.1:0", None)
    with pytest.raises(pki.InsecureTransportError):
        pki.add_server_port(server, "127.0.0.1:0", None, insecure_plaintext="yes")  # type: ignore[arg-type]
    with pytest.raises(pki.InsecureTransportError):
        pki.add_server_port(server, "127.0.0.1:0", tls.agent1, insecure_plaintext=True)
    with pytest.raises(pki.InsecureTransportError):
        pki.connect("127.0.0.1:1", None)
    with pytest.raises(pki.InsecureTransportError):
        pki.connect("127.0.0.1:1", None, insecure_plaintext=True, agent_name="host1")

    # A plaintext port behind the normal interceptor: nobody is authenticated.
    strict = serve(None, insecure_plaintext=True)
    with pki.connect(f"127.0.0.1:{strict}", None, insecure_plaintext=True) as ch:
        err = _refused(ch, STATUS)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "plaintext" in err.details()
    # ...and with an interceptor that was told plaintext is intended, calls go through.
    lax = serve(
        None, insecure_plaintext=True, interceptor=AuthzInterceptor(POLICY, insecure_plaintext=True)
    )
    with pki.connect(f"127.0.0.1:{lax}", None, insecure_plaintext=True) as ch:
        assert _call(ch, PUSH, b"x") == b"x"


def test_aio_server_and_interceptor(tls: Pki) -> None:
    async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        who = authz.peer_identity(context)
        return f"{who.role}/{who.name}".encode()

    async def pages(request: bytes, context: grpc.aio.ServicerContext):
        for b in request:
            yield bytes([b])

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "WhoAmI": grpc.unary_unary_rpc_method_handler(whoami),
            "PushMigration": grpc.unary_unary_rpc_method_handler(whoami),
            "PushPages": grpc.unary_stream_rpc_method_handler(pages),
        },
    )

    async def main() -> None:
        server = grpc.aio.server(interceptors=[AioAuthzInterceptor(POLICY)])
        server.add_generic_rpc_handlers([handler])
        port = pki.add_server_port(server, "127.0.0.1:0", tls.agent1)
        await server.start()
        try:
            target = f"127.0.0.1:{port}"
            async with pki.connect_aio(target, tls.client) as ch:
                assert await ch.unary_unary(WHOAMI)(b"", timeout=TIMEOUT) == b"client/admin"
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await ch.unary_unary(PUSH)(b"", timeout=TIMEOUT)
                assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
                with pytest.raises(grpc.aio.AioRpcError) as ei2:
                    [m async for m in ch.unary_stream(PUSH_PAGES)(b"ab", timeout=TIMEOUT)]
                assert ei2.value.code() == grpc.StatusCode.PERMISSION_DENIED
            async with pki.connect_aio(target, tls.agent2, agent_name="host1") as ch:
                assert await ch.unary_unary(PUSH)(b"", timeout=TIMEOUT) == b"agent/host2"
                got = [m async for m in ch.unary_stream(PUSH_PAGES)(b"ab", timeout=TIMEOUT)]
                assert got == [b"a", b"b"]
        finally:
            await server.stop(None)

    asyncio.run(main())


# --------------------------------------------------------------------------- policy units


def test_method_policy_rules() -> None:
    with pytest.raises(TypeError):
        MethodPolicy({PUSH: AGENT_ONLY})  # type: ignore[call-arg]  # default must be explicit
    with pytest.raises(ValueError, match="unknown role"):
        MethodPolicy({PUSH: {"agnet"}}, default=ANY_ROLE)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        MethodPolicy({PUSH: "agent"}, default=ANY_ROLE)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="policy key"):
        MethodPolicy({"PushMigration": AGENT_ONLY}, default=ANY_ROLE)

    p = MethodPolicy(
        {f"/{SERVICE}/*": AGENT_ONLY, STATUS: ANY_ROLE},
        default=NOBODY,
    )
    client, agent = PeerIdentity("client", "admin"), PeerIdentity("agent", "h1")
    assert p.allowed_roles(STATUS) == ANY_ROLE  # exact beats service wildcard
    assert p.allowed_roles(PUSH) == AGENT_ONLY
    p.check(STATUS, client)
    p.check(PUSH, agent)
    with pytest.raises(PermissionDeniedError, match="requires role agent"):
        p.check(PUSH, client)
    with pytest.raises(PermissionDeniedError, match="may not be called by anyone"):
        p.check("/other.Service/Anything", agent)  # fail closed


def test_identity_requires_tls_and_certificate() -> None:
    with pytest.raises(UnauthenticatedPeerError, match="plaintext"):
        authz.identity_from_auth_context({"transport_security_type": [b"insecure"]})
    with pytest.raises(UnauthenticatedPeerError, match="no client certificate"):
        authz.identity_from_auth_context({"transport_security_type": [b"ssl"]})
    with pytest.raises(UnauthenticatedPeerError):
        authz.identity_from_auth_context({})


def test_no_stray_files_or_world_readable_keys(tls: Pki) -> None:
    for p in tls.certs.iterdir():
        assert not p.name.endswith(".tmp")
        if p.suffix == ".key":
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_issue_into_ca_dir_and_host_normalisation(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path, "c")
    before = ca.cert.read_bytes()
    paths = pki.issue_certificate(
        tmp_path, "agent", "h1", tmp_path, ["[::1]", "::1", "Node1.Example.COM.", "10.0.0.1"]
    )
    assert paths.ca_cert == ca.cert and ca.cert.read_bytes() == before
    info = pki.verify_cert_paths(paths, role="agent")
    assert info.hosts == ("node1.example.com", "::1", "10.0.0.1")
    assert pki.agent_tls_name("h1") == "h1.agent.vmigrate.invalid"
