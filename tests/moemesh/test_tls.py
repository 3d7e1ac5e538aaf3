"""moemesh.tls: all three files or none, and roles read from a peer's auth context. (The mTLS mesh
end to end is tests/moemesh/test_tls_mesh.py; the server side, tests/moemesh/test_rpc.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from moemesh.errors import ConfigError
from moemesh.tls import TlsFiles, peer_roles, tls_files


def test_all_three_files_or_none():
    assert tls_files(None, None, None) is None
    files = tls_files(Path("/c.pem"), Path("/k.pem"), Path("/ca.pem"))
    assert files == TlsFiles(Path("/c.pem"), Path("/k.pem"), Path("/ca.pem"))
    with pytest.raises(ConfigError, match="missing --tls-key, --tls-ca"):
        tls_files(Path("/c.pem"), None, None)
    with pytest.raises(ConfigError, match="missing --tls-cert"):
        tls_files(None, Path("/k.pem"), Path("/ca.pem"))


def test_an_unreadable_file_is_a_config_error_naming_it(tmp_path: Path):
    files = TlsFiles(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match=r"cannot read TLS file .*ca\.pem"):
        files.channel_credentials()


def test_roles_are_the_moemesh_spiffe_uris_of_the_peer():
    context = {"peer_uri": [b"spiffe://moemesh/admin", b"spiffe://other/admin", b"https://moemesh/client"],
               "x509_common_name": [b"moemesh admin"]}
    assert peer_roles(context) == {"admin"}
    assert peer_roles({}) == frozenset()
    assert peer_roles({"transport_security_type": [b"insecure"]}) == frozenset()


def test_services_and_commands_read_the_files_from_flags_or_their_environment():
    import argparse

    from coordinator.cli import PlacementShow
    from gateway.settings import GatewaySettings
    from moemesh.settings import add_options, settings_from
    from moemesh.tls import tls_of

    def build(cls, argv, environ):
        parser = argparse.ArgumentParser()
        add_options(parser, cls)
        return settings_from(cls, parser.parse_args(argv), environ)

    base = ["--coordinator", "127.0.0.1:1", "--model", "/m"]
    env = {"MOEMESH_GATEWAY_TLS_CERT": "/g.pem", "MOEMESH_GATEWAY_TLS_KEY": "/g-key.pem",
           "MOEMESH_GATEWAY_TLS_CA": "/ca.pem"}
    assert tls_of(build(GatewaySettings, base, env)) == TlsFiles(Path("/g.pem"), Path("/g-key.pem"), Path("/ca.pem"))
    assert tls_of(build(GatewaySettings, [*base, "--tls-cert", "/x.pem"], env)).cert == Path("/x.pem")
    assert tls_of(build(GatewaySettings, base, {})) is None
    with pytest.raises(ConfigError, match="missing --tls-ca"):
        build(GatewaySettings, base, {k: v for k, v in env.items() if not k.endswith("_CA")})
    shared = {"MOEMESH_TLS_CERT": "/a.pem", "MOEMESH_TLS_KEY": "/a-key.pem", "MOEMESH_TLS_CA": "/ca.pem"}
    assert tls_of(build(PlacementShow, [], shared)).key == Path("/a-key.pem")
