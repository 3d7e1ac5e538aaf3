"""moemesh.certs: `moemesh certs` writes a CA and per-role certificates that verify against it, carry
their role and hosts, and keep their keys private."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from moemesh.certs import ROLES, write_certs
from moemesh.cli import main
from moemesh.errors import ConfigError


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_every_role_gets_a_certificate_signed_by_the_ca_naming_its_role_and_hosts(tmp_path: Path):
    written = write_certs(tmp_path, ["node-a", "10.0.0.7"], days=30)
    assert tuple(written) == ROLES
    ca = _cert(tmp_path / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role, files in written.items():
        cert = _cert(files.cert)
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://moemesh/{role}"]
        assert set(sans.get_values_for_type(x509.DNSName)) == {"node-a", "localhost"}
        assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(h)
                                                                 for h in ("10.0.0.7", "127.0.0.1", "::1")}
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert files.ca == tmp_path / "ca.pem"
    for key in [tmp_path / "ca-key.pem", *(f.key for f in written.values())]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_an_existing_ca_is_kept_unless_forced_and_the_cli_writes_the_same(tmp_path: Path, capsys):
    write_certs(tmp_path, roles=("client",))
    with pytest.raises(ConfigError, match="exists; pass --force"):
        write_certs(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()
    assert main(["certs", str(tmp_path), "--nodes", "h1,h2"]) == 2  # refused: the CA is kept
    assert (tmp_path / "ca.pem").read_bytes() == before
    assert main(["certs", str(tmp_path), "--nodes", "h1,h2", "--force"]) == 0
    assert "coordinator, worker, gateway, admin, client" in capsys.readouterr().out
    cert = _cert(tmp_path / "gateway.pem")
    cert.verify_directly_issued_by(_cert(tmp_path / "ca.pem"))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"h1", "h2"} <= set(names.get_values_for_type(x509.DNSName))
