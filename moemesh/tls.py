"""mTLS for every moemesh server and channel: the one place credentials are made, and peer roles.

A process given `--tls-cert --tls-key --tls-ca` (all three, or none) serves only over TLS and
requires every client to present a certificate signed by that CA (`server_credentials`), and dials
its peers over TLS with its own certificate (`channel_credentials`): a peer without a certificate,
with one from another CA, or without the matching key fails the handshake (grpc: UNAVAILABLE).
Without the three files everything stays plaintext and open, as before (docs/security.md).

A certificate's role (coordinator, worker, gateway, admin, client) is its SAN URI
`spiffe://moemesh/<role>` (`moemesh certs` writes it); `peer_roles` reads it from a call's
auth context, for the authorization rules in moemesh.rpc.

Every service and every CLI command that dials declares the three flags with `tls_options`'s
fields (`tls_cert`, `tls_key`, `tls_ca`) and reads them with `tls_of(settings)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from moemesh.errors import ConfigError
from moemesh.settings import option

ROLE_URI_PREFIX = "spiffe://moemesh/"


def _absolute(text: str) -> Path:
    return Path(text).resolve()


def cert_option(env: str | None = None) -> Any:
    """The `--tls-cert` field; `env` names a shared variable (one-shot tools), else the class prefix's."""
    return option("--tls-cert", "this process's certificate (PEM) for mTLS; with --tls-key and --tls-ca",
                  _absolute, default=None, env=env, metavar="PEM")


def key_option(env: str | None = None) -> Any:
    return option("--tls-key", "the private key of --tls-cert (PEM)", _absolute, default=None, env=env, metavar="PEM")


def ca_option(env: str | None = None) -> Any:
    return option("--tls-ca", "the CA certificate (PEM) every peer's certificate must be signed by", _absolute,
                  default=None, env=env, metavar="PEM")


@dataclass(frozen=True)
class TlsFiles:
    """A process's certificate, its key and the CA it trusts (PEM files)."""

    cert: Path
    key: Path
    ca: Path

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS with a required client certificate signed by the CA."""
        return grpc.ssl_server_credentials([(self._read(self.key), self._read(self.cert))],
                                           root_certificates=self._read(self.ca), require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS that trusts only the CA and presents this process's certificate."""
        return grpc.ssl_channel_credentials(self._read(self.ca), self._read(self.key), self._read(self.cert))

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read TLS file {path}: {exc.strerror or exc}") from exc


def tls_files(cert: Path | None, key: Path | None, ca: Path | None) -> TlsFiles | None:
    """TlsFiles when all three are given, None when none is; ConfigError for one or two."""
    given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
    if all(v is None for v in given.values()):
        return None
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
        raise ConfigError(f"mTLS needs --tls-cert, --tls-key and --tls-ca together; missing {', '.join(missing)}")
    assert cert is not None and key is not None and ca is not None
    return TlsFiles(cert, key, ca)


def tls_of(settings: Any) -> TlsFiles | None:
    """`tls_files` of a settings object's `tls_cert`, `tls_key`, `tls_ca` fields."""
    return tls_files(settings.tls_cert, settings.tls_key, settings.tls_ca)


def peer_roles(auth_context: Mapping[str, Sequence[bytes]]) -> frozenset[str]:
    """The moemesh roles a TLS peer's certificate names (its `spiffe://moemesh/<role>` SAN URIs);
    empty for a peer without one, or on a plaintext connection."""
    roles = set()
    for uri in auth_context.get("peer_uri", ()):
        text = uri.decode("utf-8", "replace")
        if text.startswith(ROLE_URI_PREFIX):
            roles.add(text.removeprefix(ROLE_URI_PREFIX))
    return frozenset(roles)
