"""TLS and mutual TLS for every server and channel, from PEM files (a mounted Kubernetes Secret).

- Servers: `--tls-cert/--tls-key` turn TLS on; `--tls-client-ca` also requires a client certificate signed by
  that CA (mTLS). The files are read again when they change (cert-manager rotates the Secret in place), at the
  next handshake, without a restart.
- Clients (the gateway's channels to its backends, the `rag` commands): `--tls-ca` turns TLS on and verifies the
  server against that CA; `--tls-cert/--tls-key`, when set, are presented as the client certificate. The
  gateway's channels are made again when these files change (rag.clients.Backend).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from rag.config import option
from rag.errors import FailedPrecondition

log = logging.getLogger(__name__)


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise FailedPrecondition(f"cannot read the TLS {what} {path}: {err}") from err
    if b"-----BEGIN" not in data:
        raise FailedPrecondition(f"the TLS {what} {path} is not PEM")
    return data


def _stamp(*paths: str) -> tuple[int, ...]:
    """When the given files last changed (what tells a rotation; -1 for one that cannot be read)."""

    def mtime(path: str) -> int:
        try:
            return Path(path).stat().st_mtime_ns
        except OSError:
            return -1

    return tuple(mtime(p) for p in paths if p)


@dataclass(frozen=True)
class ServerTLS:
    cert: str = ""
    key: str = ""
    client_ca: str = ""  # set: clients must present a certificate it signed (mTLS)

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise FailedPrecondition("give both --tls-cert and --tls-key, or neither")
        if self.client_ca and not self.cert:
            raise FailedPrecondition("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        pair = [(_read(self.key, "key"), _read(self.cert, "certificate"))]
        ca = _read(self.client_ca, "client CA") if self.client_ca else None
        return grpc.ssl_server_certificate_configuration(pair, root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that reread the files at the next handshake after any of them changed."""
        stamps = _stamp(self.cert, self.key, self.client_ca)

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal stamps
            now = _stamp(self.cert, self.key, self.client_ca)
            if now == stamps:
                return None  # unchanged: keep the current configuration
            try:
                configuration = self._configuration()
            except FailedPrecondition as err:  # mid-rotation: keep serving with what we have
                log.warning("TLS files changed but cannot be read yet (%s); keeping the previous ones", err)
                return None
            stamps = now
            log.info("TLS certificate reloaded from %s", self.cert)
            return configuration

        return grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            fetch,  # type: ignore[arg-type]  # grpc's docs: returning None keeps the configuration; the stub omits it
            require_client_authentication=bool(self.client_ca),
        )


@dataclass(frozen=True)
class ClientTLS:
    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""  # the name the server's certificate carries, when the address is an IP

    def channel_options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.enabled and self.server_name else []

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise FailedPrecondition("give both --tls-cert and --tls-key, or neither")

    @property
    def enabled(self) -> bool:
        return bool(self.ca)

    def stamp(self) -> tuple[int, ...]:
        """When its files last changed: rag.clients.Backend makes its channel again after a change."""
        return _stamp(self.ca, self.cert, self.key)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA"),
            private_key=_read(self.key, "key") if self.key else None,
            certificate_chain=_read(self.cert, "certificate") if self.cert else None,
        )


@dataclass
class ClientTLSConfig:
    """The TLS flags of a command-line client (mixed into its config)."""

    tls_ca: str = option("", "CA certificate (PEM) to verify the server with; set: TLS")
    tls_cert: str = option("", "client certificate (PEM) to present, for servers that require mTLS")
    tls_key: str = option("", "private key (PEM) of --tls-cert")
    tls_server_name: str = option("", "name the server's certificate carries, if not the address's host")

    def client_tls(self) -> ClientTLS:
        return ClientTLS(self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name)
