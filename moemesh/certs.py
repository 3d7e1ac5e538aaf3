"""`moemesh certs DIR --nodes host1,host2`: a private CA and one certificate per role, for mTLS.

For tests and small clusters (a real deployment may use its own PKI: any CA works, as long as each
certificate names its role as below). Written with the `cryptography` library:

- `ca.pem` (the CA certificate every process trusts, `--tls-ca`) and `ca-key.pem`;
- per role (coordinator, worker, gateway, admin, client): `<role>.pem` and `<role>-key.pem`.

Every certificate is valid for the given hosts plus localhost / 127.0.0.1 / ::1 (DNS and IP SANs)
and for both TLS server and client use, and carries its role twice: a SAN URI
`spiffe://moemesh/<role>` (what the services read, `moemesh.tls.peer_roles`) and the subject's OU.
Keys are ECDSA P-256, written 0600. The folder holds secrets: never commit it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from moemesh.errors import ConfigError
from moemesh.settings import option, parse_bool
from moemesh.tls import ROLE_URI_PREFIX

ROLES = ("coordinator", "worker", "gateway", "admin", "client")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_FILE = "ca.pem"


def _hosts(text: str) -> tuple[str, ...]:
    return tuple(h.strip() for h in text.split(",") if h.strip())


@dataclass(frozen=True)
class CertsSettings:
    """`moemesh certs`: a one-shot tool, flags only."""

    ENV_PREFIX: ClassVar[str | None] = None

    out: Path = option("dir", "folder to write the CA and the certificates into (created; files 0600 for keys)",
                       Path)
    nodes: tuple[str, ...] = option("--nodes", "comma-separated host names / IPs every certificate is valid for "
                                    "(localhost and 127.0.0.1 are always added)", _hosts, default=())
    days: int = option("--days", "validity in days", int, default=365)
    force: bool = option("--force", "overwrite an existing CA in DIR", parse_bool, default=False)

    def __post_init__(self) -> None:
        if self.days < 1:
            raise ConfigError(f"--days must be at least 1, got {self.days}")


@dataclass(frozen=True)
class RoleFiles:
    """Where one role's certificate and key are, with the CA every peer trusts."""

    cert: Path
    key: Path
    ca: Path

    def flags(self) -> tuple[str, ...]:
        """`--tls-cert C --tls-key K --tls-ca CA`: what a service or a CLI command is given."""
        return ("--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca))


def role_files(folder: Path, role: str) -> RoleFiles:
    """The files `write_certs` made for `role` in `folder`."""
    return RoleFiles(folder / f"{role}.pem", folder / f"{role}-key.pem", folder / CA_FILE)


def write_certs(folder: Path, hosts: Iterable[str] = (), days: int = 365, roles: Sequence[str] = ROLES,
                overwrite: bool = False) -> dict[str, RoleFiles]:
    """A new CA and one certificate per role in `folder` (module docstring); returns each role's files.
    ConfigError if `folder` already holds a CA and not `overwrite` (certificates signed by the old CA
    would silently stop working together)."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / CA_FILE).exists() and not overwrite:
        raise ConfigError(f"{folder / CA_FILE} exists; pass --force to make a new CA (every certificate changes)")
    names = tuple(dict.fromkeys((*hosts, *LOCAL_HOSTS)))
    ca_key, ca_cert = _make_ca(days)
    _write_key(folder / "ca-key.pem", ca_key)
    _write(folder / CA_FILE, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    out = {}
    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _make_leaf(role, names, key, ca_key, ca_cert, days)
        files = role_files(folder, role)
        _write_key(files.key, key)
        _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        out[role] = files
    return out


def _name(common: str, unit: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "moemesh"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (builder.serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew between nodes
            .not_valid_after(now + datetime.timedelta(days=days)))


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("moemesh CA", "ca")
    builder = _validity(x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()),
                        days)
    cert = (builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _make_leaf(role: str, hosts: Sequence[str], key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
               ca_cert: x509.Certificate, days: int) -> x509.Certificate:
    sans = [*(_san(h) for h in hosts), x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role)]
    builder = (x509.CertificateBuilder().subject_name(_name(f"moemesh {role}", role))
               .issuer_name(ca_cert.subject).public_key(key.public_key()))
    return (_validity(builder, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()), 0o600)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` created with `mode` from the start (a key is never readable by others)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, mode)  # the umask may have narrowed it
    tmp.replace(path)
