"""Cluster PKI for vmigrate: the CA, agent/client certificates and gRPC transport credentials.

Every agent (``vmigrated``) and every CLI user authenticates with mutual TLS under one
cluster CA that ``vmigrate init`` creates with :func:`create_ca`. Certificates are issued
with :func:`issue_certificate` and carry their role in two independent places so that a
client certificate can never pass for an agent:

* a SAN URI ``vmigrate://agent/<name>`` or ``vmigrate://client/<name>`` (the identity the
  server-side authorization in :mod:`vmigrate.migrate.authz` reads), and
* the ExtendedKeyUsage: agents get serverAuth + clientAuth (an agent serves RPCs and also
  calls other agents when it pushes a migration), clients get clientAuth only, so the TLS
  stack itself refuses a client certificate presented as a server certificate.

Keys are ECDSA P-256: grpcio's BoringSSL accepts it for server and client certificates on
TLS 1.2 and 1.3, whereas Ed25519 certificates fail the handshake with
``NO_COMMON_SIGNATURE_ALGORITHMS`` (BoringSSL does not offer Ed25519 by default).

Agent certificates also get a reserved DNS SAN ``<name>.agent.vmigrate.invalid`` (see
:func:`agent_tls_name`). ``connect(..., agent_name="host1")`` sets gRPC's
``grpc.ssl_target_name_override`` to it, which pins the peer to *that* agent whatever
address it is reached by; without ``agent_name`` the target host (IP or DNS name) is
checked against the certificate's IP/DNS SANs as usual.

Plaintext is possible only by passing ``paths=None`` *and* ``insecure_plaintext=True``;
anything else either uses mutual TLS or raises :class:`InsecureTransportError`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal, cast, get_args

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

Role = Literal["agent", "client"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)

URI_PREFIX: Final = "vmigrate://"
AGENT_TLS_SUFFIX: Final = ".agent.vmigrate.invalid"
CA_CERT_NAME: Final = "ca.crt"
CA_KEY_NAME: Final = "ca.key"
DEFAULT_CA_DAYS: Final = 3650
DEFAULT_CERT_DAYS: Final = 365
# Backdate notBefore a little so a peer whose clock lags ours still accepts a fresh cert.
CLOCK_SKEW: Final = timedelta(minutes=5)

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME_RE: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_NAME_MAX: Final = 63
_DNS_MAX: Final = 253

_AGENT_EKU: Final = frozenset({ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH})
_CLIENT_EKU: Final = frozenset({ExtendedKeyUsageOID.CLIENT_AUTH})


# --------------------------------------------------------------------------- errors


class PkiError(Exception):
    """Base of every PKI/transport error; ``str(err)`` is one line meant for the operator."""


class PkiFileMissingError(PkiError, FileNotFoundError):
    """A certificate or key file does not exist."""


class PkiFileExistsError(PkiError, FileExistsError):
    """Refusing to overwrite an existing certificate or key (pass ``force=True``)."""


class CaExistsError(PkiFileExistsError):
    """A CA already exists in the directory; re-creating it would orphan every issued cert."""


class InvalidCertificateError(PkiError):
    """A file is not a usable certificate/key (bad PEM, wrong key type, no vmigrate identity)."""


class UntrustedCertificateError(PkiError):
    """The certificate was not issued by the cluster CA."""


class CertificateValidityError(PkiError):
    """The certificate is outside its validity period."""


class CertificateExpiredError(CertificateValidityError):
    """The certificate (or the CA) has expired."""


class CertificateNotYetValidError(CertificateValidityError):
    """The certificate's notBefore is in the future (clock skew?)."""


class WrongRoleError(PkiError):
    """The certificate has a different role than required (e.g. a client cert for an agent)."""


class KeyMismatchError(PkiError):
    """The private key does not belong to the certificate."""


class InvalidNameError(PkiError, ValueError):
    """A cluster, agent/client or host name cannot be put in a certificate."""


class InsecureTransportError(PkiError):
    """Plaintext was not explicitly requested, or TLS paths and plaintext were both given."""


# --------------------------------------------------------------------------- paths & info


@dataclass(frozen=True)
class CaPaths:
    """Where the cluster CA lives: ``<dir>/ca.crt`` and ``<dir>/ca.key`` (0600)."""

    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> CaPaths:
        """The standard file names inside a CA directory."""
        directory = Path(directory)
        return cls(cert=directory / CA_CERT_NAME, key=directory / CA_KEY_NAME)


@dataclass(frozen=True)
class CertPaths:
    """A leaf certificate, its private key and the CA certificate used to verify peers."""

    cert: Path
    key: Path
    ca_cert: Path

    @classmethod
    def in_dir(cls, directory: Path, role: Role, name: str) -> CertPaths:
        """Standard names: ``<role>-<name>.crt``/``.key`` next to a copy of ``ca.crt``."""
        directory = Path(directory)
        return cls(
            cert=directory / f"{role}-{name}.crt",
            key=directory / f"{role}-{name}.key",
            ca_cert=directory / CA_CERT_NAME,
        )


@dataclass(frozen=True)
class CertInfo:
    """What a verified certificate says about its holder."""

    role: Role
    name: str
    cluster: str
    hosts: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    serial: int
    fingerprint_sha256: str


# --------------------------------------------------------------------------- names


def validate_name(name: str, what: str = "name") -> str:
    """Check a cluster/agent/client name: lowercase DNS-like, so it fits URIs and DNS SANs."""
    if not isinstance(name, str) or len(name) > _NAME_MAX or not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1-{_NAME_MAX} lowercase letters, digits, '-' and '.'"
        )
    return name


def agent_tls_name(name: str) -> str:
    """The reserved DNS SAN every agent certificate carries, used to pin a specific agent.

    ``.invalid`` (RFC 2606) never resolves, so it can only ever match through
    ``grpc.ssl_target_name_override``, and :func:`issue_certificate` refuses it as a host.
    """
    return validate_name(name, "agent name") + AGENT_TLS_SUFFIX


def identity_uri(role: Role, name: str) -> str:
    """The SAN URI that carries a certificate's role and name."""
    if role not in ROLES:
        raise WrongRoleError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    return f"{URI_PREFIX}{role}/{validate_name(name, f'{role} name')}"


def parse_identity_uri(uri: str) -> tuple[Role, str]:
    """Inverse of :func:`identity_uri`; raises :class:`InvalidCertificateError`."""
    if not uri.startswith(URI_PREFIX):
        raise InvalidCertificateError(f"not a vmigrate identity URI: {uri!r}")
    role, sep, name = uri[len(URI_PREFIX) :].partition("/")
    if not sep or role not in ROLES or len(name) > _NAME_MAX or not _NAME_RE.fullmatch(name):
        raise InvalidCertificateError(f"malformed vmigrate identity URI: {uri!r}")
    return cast(Role, role), name


def _parse_hosts(role: Role, hosts: Iterable[str]) -> list[x509.GeneralName]:
    """Turn agent host names/addresses into SAN entries (IP addresses as IP SANs)."""
    hosts = list(hosts)
    if role == "client":
        if hosts:
            raise InvalidNameError("client certificates carry no hosts: pass hosts=[]")
        return []
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in hosts:
        if not isinstance(raw, str) or not raw:
            raise InvalidNameError(f"invalid host {raw!r}")
        host = raw.strip().lower()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        entry: x509.GeneralName
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            host = host.rstrip(".")
            if (
                len(host) > _DNS_MAX
                or not _NAME_RE.fullmatch(host)
                or host.endswith(AGENT_TLS_SUFFIX)
            ):
                raise InvalidNameError(
                    f"invalid host {raw!r}: expected an IP address or a DNS name "
                    f"(no wildcards, not ending in {AGENT_TLS_SUFFIX})"
                )
            key, entry = f"dns:{host}", x509.DNSName(host)
        else:
            if getattr(ip, "scope_id", None):
                raise InvalidNameError(f"invalid host {raw!r}: scoped IPv6 address")
            key, entry = f"ip:{ip}", x509.IPAddress(ip)
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


# --------------------------------------------------------------------------- file I/O


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PkiFileMissingError(f"{what} not found: {path}")
    except IsADirectoryError:
        raise InvalidCertificateError(f"{what} {path} is a directory, not a file")
    except PermissionError:
        raise PkiError(f"cannot read {what} {path}: permission denied")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int, *, overwrite: bool, what: str) -> None:
    """Write via a temp file in the same directory, then rename (or hard-link) into place.

    Readers never see a partial file, and the file never exists with laxer permissions
    than ``mode`` (it is created with it). Without ``overwrite`` the final step is
    ``link()``, which fails instead of clobbering a file another process just wrote.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise PkiFileExistsError(
                    f"refusing to overwrite existing {what} {path} (use force to replace it)"
                )
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_cert(data: bytes, path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise InvalidCertificateError(f"{what} {path} is not a PEM X.509 certificate")


def _load_key(data: bytes, path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise InvalidCertificateError(f"{what} {path} is encrypted; vmigrate needs it unencrypted")
    except ValueError:
        raise InvalidCertificateError(f"{what} {path} is not a PEM private key")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidCertificateError(f"{what} {path} is not an ECDSA P-256 key")
    mode = os.stat(path).st_mode
    if mode & 0o077:
        logger.warning(
            "%s %s is accessible by group/others (mode %o); chmod 600 it", what, path, mode & 0o777
        )
    return key


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_key_matches(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path
) -> None:
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise KeyMismatchError(f"private key {key_path} does not match certificate {cert_path}")


def _check_validity(cert: x509.Certificate, path: Path, what: str, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateNotYetValidError(
            f"{what} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ} "
            f"(now {now:%Y-%m-%d %H:%M:%SZ}; check the clock)"
        )
    if now > cert.not_valid_after_utc:
        raise CertificateExpiredError(
            f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
        )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _cluster_of(ca: x509.Certificate) -> str:
    attrs = ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(attrs[0].value) if attrs else ""


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":")


@dataclass(frozen=True)
class _Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    pem: bytes


def _load_ca(ca_dir: Path, now: datetime) -> _Ca:
    paths = CaPaths.in_dir(ca_dir)
    pem = _read(paths.cert, "CA certificate")
    cert = _load_cert(pem, paths.cert, "CA certificate")
    key = _load_key(_read(paths.key, "CA private key"), paths.key, "CA private key")
    if not _is_ca(cert):
        raise InvalidCertificateError(f"{paths.cert} is not a CA certificate")
    _check_key_matches(cert, key, paths.cert, paths.key)
    _check_validity(cert, paths.cert, "CA certificate", now)
    return _Ca(cert=cert, key=key, pem=pem)


# --------------------------------------------------------------------------- CA & issuance


def create_ca(
    dir: Path,
    cluster_name: str,
    *,
    days: int = DEFAULT_CA_DAYS,
    force: bool = False,
) -> CaPaths:
    """Create the cluster CA (ECDSA P-256) in ``dir``: ``ca.crt`` (0644) and ``ca.key`` (0600).

    Refuses (:class:`CaExistsError`) if either file exists unless ``force``: a new CA
    silently invalidates every certificate issued by the old one.
    """
    validate_name(cluster_name, "cluster name")
    if not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive integer, got {days!r}")
    directory = Path(dir)
    paths = CaPaths.in_dir(directory)
    if not force:
        for p in (paths.key, paths.cert):
            if p.exists() or p.is_symlink():
                raise CaExistsError(
                    f"a CA already exists in {directory} ({p.name}); refusing to overwrite it "
                    "(force=True replaces it and invalidates every issued certificate)"
                )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"vmigrate cluster CA {cluster_name}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        # path_length=0: the CA can only sign leaves, never an intermediate CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash in between leaves a key without a cert, which the next
    # create_ca refuses loudly instead of pairing a cert with the wrong key.
    _write_atomic(paths.key, _key_pem(key), 0o600, overwrite=force, what="CA private key")
    _write_atomic(paths.cert, _cert_pem(cert), 0o644, overwrite=force, what="CA certificate")
    logger.info("created vmigrate CA for cluster %r in %s", cluster_name, directory)
    return paths


def issue_certificate(
    ca_dir: Path,
    role: Role,
    name: str,
    out_dir: Path,
    hosts: Sequence[str] = (),
    days: int = DEFAULT_CERT_DAYS,
    *,
    force: bool = False,
    valid_from: datetime | None = None,
) -> CertPaths:
    """Issue an agent or client certificate signed by the CA in ``ca_dir``.

    Writes ``<role>-<name>.crt``, ``<role>-<name>.key`` (0600) and a copy of ``ca.crt``
    into ``out_dir`` so the directory can be shipped to a host as is. ``hosts`` are the IP
    addresses / DNS names peers dial the agent by (agents only). Existing files are not
    replaced unless ``force`` (renewal). ``valid_from`` (default: now) exists for
    backdating, e.g. to test expiry.
    """
    if role not in ROLES:
        raise WrongRoleError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    validate_name(name, f"{role} name")
    if isinstance(hosts, str):
        raise InvalidNameError(f"hosts must be a list of names, not the string {hosts!r}")
    host_sans = _parse_hosts(role, hosts)
    if not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive integer, got {days!r}")

    now = datetime.now(UTC)
    ca = _load_ca(Path(ca_dir), now)
    cluster = _cluster_of(ca.cert)
    if valid_from is None:
        not_before, not_after = now - CLOCK_SKEW, now + timedelta(days=days)
    else:
        if valid_from.tzinfo is None:
            raise ValueError("valid_from must be timezone-aware")
        not_before, not_after = valid_from, valid_from + timedelta(days=days)
    if not_after > ca.cert.not_valid_after_utc:
        raise PkiError(
            f"a {days}-day certificate would outlive the CA (expires "
            f"{ca.cert.not_valid_after_utc:%Y-%m-%d}); issue a shorter one or renew the CA"
        )

    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity_uri(role, name))]
    if role == "agent":
        sans.append(x509.DNSName(agent_tls_name(name)))
    sans.extend(host_sans)
    if role == "agent":
        ekus = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    else:
        ekus = [ExtendedKeyUsageOID.CLIENT_AUTH]
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster or "vmigrate"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca.key, hashes.SHA256())
    )

    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = CertPaths.in_dir(out, role, name)
    if not force:
        for p in (paths.key, paths.cert):
            if p.exists() or p.is_symlink():
                raise PkiFileExistsError(
                    f"refusing to overwrite existing {p} (use force=True to renew)"
                )
    # Copy ca.crt next to the leaf unless out_dir is the CA directory itself.
    ca_src = CaPaths.in_dir(Path(ca_dir)).cert
    if not (paths.ca_cert.exists() and paths.ca_cert.samefile(ca_src)):
        try:
            existing: bytes | None = paths.ca_cert.read_bytes()
        except FileNotFoundError:
            existing = None
        if existing != ca.pem:
            if existing is not None and not force:
                raise PkiFileExistsError(
                    f"{paths.ca_cert} holds a different CA certificate; refusing to replace it "
                    "(force=True replaces it)"
                )
            _write_atomic(paths.ca_cert, ca.pem, 0o644, overwrite=True, what="CA certificate")
    _write_atomic(paths.key, _key_pem(key), 0o600, overwrite=force, what="private key")
    _write_atomic(paths.cert, _cert_pem(cert), 0o644, overwrite=force, what="certificate")
    logger.info("issued %s certificate for %r (cluster %r) in %s", role, name, cluster, out)
    return paths


# --------------------------------------------------------------------------- verification


def certificate_identity(cert: x509.Certificate) -> tuple[Role, str]:
    """The (role, name) a certificate carries, cross-checked against its ExtendedKeyUsage.

    Requires exactly one ``vmigrate://`` SAN URI; an agent must have serverAuth and
    clientAuth, a client clientAuth but *not* serverAuth. Raises
    :class:`InvalidCertificateError` or :class:`WrongRoleError`.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidCertificateError("certificate has no subjectAltName, so no vmigrate identity")
    uris = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(URI_PREFIX)
    ]
    if len(uris) != 1:
        raise InvalidCertificateError(
            f"certificate must carry exactly one {URI_PREFIX}<role>/<name> SAN URI, has {len(uris)}"
        )
    role, name = parse_identity_uri(uris[0])
    try:
        ekus = frozenset(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        ekus = frozenset()
    if role == "agent" and not ekus >= _AGENT_EKU:
        raise WrongRoleError(
            f"certificate claims role agent {name!r} but lacks serverAuth+clientAuth usage"
        )
    if role == "client" and (not ekus >= _CLIENT_EKU or ExtendedKeyUsageOID.SERVER_AUTH in ekus):
        raise WrongRoleError(
            f"certificate claims role client {name!r} but its key usage is not clientAuth only"
        )
    return role, name


def _info(cert: x509.Certificate, ca: x509.Certificate) -> CertInfo:
    role, name = certificate_identity(cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    hosts = [d for d in san.get_values_for_type(x509.DNSName) if not d.endswith(AGENT_TLS_SUFFIX)]
    hosts += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return CertInfo(
        role=role,
        name=name,
        cluster=_cluster_of(ca),
        hosts=tuple(hosts),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        serial=cert.serial_number,
        fingerprint_sha256=_fingerprint(cert),
    )


@dataclass(frozen=True)
class _Material:
    info: CertInfo
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


def _load_material(paths: CertPaths, role: Role | None, now: datetime | None) -> _Material:
    """Read the three files once and check them; the same bytes then go to gRPC."""
    now = now or datetime.now(UTC)
    cert_pem = _read(paths.cert, "certificate")
    key_pem = _read(paths.key, "private key")
    ca_pem = _read(paths.ca_cert, "CA certificate")
    cert = _load_cert(cert_pem, paths.cert, "certificate")
    key = _load_key(key_pem, paths.key, "private key")
    ca = _load_cert(ca_pem, paths.ca_cert, "CA certificate")
    if len(x509.load_pem_x509_certificates(ca_pem)) != 1:
        raise InvalidCertificateError(f"{paths.ca_cert} must hold exactly one CA certificate")
    if not _is_ca(ca):
        raise InvalidCertificateError(f"{paths.ca_cert} is not a CA certificate")
    _check_key_matches(cert, key, paths.cert, paths.key)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise UntrustedCertificateError(
            f"certificate {paths.cert} was not issued by the CA in {paths.ca_cert} "
            f"(issuer {cert.issuer.rfc4514_string()!r}, CA {ca.subject.rfc4514_string()!r})"
        )
    _check_validity(ca, paths.ca_cert, "CA certificate", now)
    _check_validity(cert, paths.cert, "certificate", now)
    info = _info(cert, ca)
    if role is not None and info.role != role:
        raise WrongRoleError(
            f"certificate {paths.cert} is for {info.role} {info.name!r}, but a {role} "
            "certificate is required here"
        )
    return _Material(info=info, cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem)


def verify_cert_paths(
    paths: CertPaths, *, role: Role | None = None, now: datetime | None = None
) -> CertInfo:
    """Check that cert, key and CA files are present and consistent, and describe the cert.

    This is what the credential helpers run first, so a misconfigured host fails at start-up
    with a one-line reason instead of with an opaque TLS handshake failure on first use.
    """
    return _load_material(paths, role, now).info


# --------------------------------------------------------------------------- gRPC transport


def server_credentials(paths: CertPaths) -> grpc.ServerCredentials:
    """mTLS credentials for an agent's server port: needs an agent cert, requires and
    verifies a client certificate issued by the cluster CA on every connection."""
    m = _load_material(paths, "agent", None)
    return grpc.ssl_server_credentials(
        [(m.key_pem, m.cert_pem)], root_certificates=m.ca_pem, require_client_auth=True
    )


def channel_credentials(paths: CertPaths, *, role: Role | None = None) -> grpc.ChannelCredentials:
    """mTLS credentials for calling an agent: presents our cert, trusts only the cluster CA.

    ``role`` optionally insists on the cert's role (the CLI should pass ``"client"``, an
    agent calling another agent ``"agent"``) so a host never borrows the wrong identity.
    """
    m = _load_material(paths, role, None)
    return grpc.ssl_channel_credentials(
        root_certificates=m.ca_pem, private_key=m.key_pem, certificate_chain=m.cert_pem
    )


def agent_channel_options(agent_name: str) -> list[tuple[str, str]]:
    """Channel options that accept only the certificate of agent ``agent_name``.

    gRPC checks the server certificate against ``grpc.ssl_target_name_override`` instead of
    the dialled host, so the channel works by any IP/name yet talks only to that agent.
    """
    return [("grpc.ssl_target_name_override", agent_tls_name(agent_name))]


def _check_plaintext_request(paths: CertPaths | None, insecure_plaintext: bool) -> bool:
    """True for plaintext; only ``paths=None`` with ``insecure_plaintext=True`` (a real bool)."""
    if paths is None:
        if insecure_plaintext is not True:
            raise InsecureTransportError(
                "no certificate paths given; pass insecure_plaintext=True to run WITHOUT TLS "
                "and authentication (testing only)"
            )
        return True
    if insecure_plaintext is not False:
        raise InsecureTransportError(
            "certificate paths and insecure_plaintext were both given; choose one"
        )
    if not isinstance(paths, CertPaths):
        raise TypeError(f"paths must be CertPaths or None, not {type(paths).__name__}")
    return False


def add_server_port(
    server: grpc.Server | grpc.aio.Server,
    address: str,
    paths: CertPaths | None,
    *,
    insecure_plaintext: bool = False,
) -> int:
    """Bind ``address`` with mTLS (agent cert in ``paths``), or plaintext only if asked.

    Returns the bound port (useful with ``:0``). Works for sync and asyncio servers.
    """
    if _check_plaintext_request(paths, insecure_plaintext):
        logger.warning("serving gRPC on %s WITHOUT TLS or authentication", address)
        port = server.add_insecure_port(address)
    else:
        assert paths is not None
        port = server.add_secure_port(address, server_credentials(paths))
    if not port:
        raise OSError(f"could not bind gRPC server to {address}")
    return port


def _channel_setup(
    paths: CertPaths | None,
    agent_name: str | None,
    role: Role | None,
    insecure_plaintext: bool,
    options: Sequence[tuple[str, object]],
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, object]]]:
    opts = list(options)
    if _check_plaintext_request(paths, insecure_plaintext):
        if agent_name is not None:
            raise InsecureTransportError("agent_name pinning needs TLS, not insecure_plaintext")
        return None, opts
    assert paths is not None
    if agent_name is not None:
        if any(k == "grpc.ssl_target_name_override" for k, _ in opts):
            raise ValueError("pass either agent_name or grpc.ssl_target_name_override, not both")
        opts.extend(agent_channel_options(agent_name))
    return channel_credentials(paths, role=role), opts


def connect(
    target: str,
    paths: CertPaths | None,
    *,
    agent_name: str | None = None,
    role: Role | None = None,
    insecure_plaintext: bool = False,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.Channel:
    """Open a channel to an agent at ``target`` (``host:port``, ``[v6]:port``, ``dns:///…``).

    Without ``agent_name`` the agent's cert must list the target host (IP or DNS) in its
    SANs. With ``agent_name`` the cert must be that agent's, whatever the address; use this
    when a migration source hands memory to a destination, so a wrong address or DNS entry
    cannot redirect a guest to another agent.
    """
    creds, opts = _channel_setup(paths, agent_name, role, insecure_plaintext, options)
    if creds is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, creds, options=opts)


def connect_aio(
    target: str,
    paths: CertPaths | None,
    *,
    agent_name: str | None = None,
    role: Role | None = None,
    insecure_plaintext: bool = False,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.aio.Channel:
    """:func:`connect` for ``grpc.aio``."""
    creds, opts = _channel_setup(paths, agent_name, role, insecure_plaintext, options)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, creds, options=opts)


__all__ = [
    "AGENT_TLS_SUFFIX",
    "ROLES",
    "CaExistsError",
    "CaPaths",
    "CertInfo",
    "CertPaths",
    "CertificateExpiredError",
    "CertificateNotYetValidError",
    "CertificateValidityError",
    "InsecureTransportError",
    "InvalidCertificateError",
    "InvalidNameError",
    "KeyMismatchError",
    "PkiError",
    "PkiFileExistsError",
    "PkiFileMissingError",
    "Role",
    "UntrustedCertificateError",
    "WrongRoleError",
    "add_server_port",
    "agent_channel_options",
    "agent_tls_name",
    "certificate_identity",
    "channel_credentials",
    "connect",
    "connect_aio",
    "create_ca",
    "identity_uri",
    "issue_certificate",
    "parse_identity_uri",
    "server_credentials",
    "validate_name",
    "verify_cert_paths",
]
