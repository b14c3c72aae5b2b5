"""TLS for the gRPC listeners and mutual TLS between router and sender.

Server side (every service): ``SLUICE_TLS_CERT_FILE`` and ``SLUICE_TLS_KEY_FILE`` (PEM) turn
TLS on; ``SLUICE_TLS_CLIENT_CA_FILE`` additionally requires every client to present a
certificate signed by that CA (mutual TLS: the sender sets it, so only routers holding a
client certificate can even open a connection). The files are re-read when they change
(checked at each new handshake, at most every few seconds), so cert-manager style rotation
needs no restart.

Client side (the router's channel to senders): ``SLUICE_SENDER_TLS_CA_FILE`` verifies the
sender, ``SLUICE_SENDER_TLS_CERT_FILE``/``SLUICE_SENDER_TLS_KEY_FILE`` are the router's
client certificate. Plaintext is the default only so that ``sluice dev`` and tests need no
certificates; the Kubernetes manifests turn TLS on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc

from sluice.common.errors import ConfigError

log = logging.getLogger("sluice.tls")

_RECHECK_SECONDS = 5.0


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from exc


class _ReloadingServerConfig:
    """Fetches a new certificate configuration when the files' mtimes change."""

    def __init__(self, cert: str, key: str, client_ca: str) -> None:
        self._paths = tuple(p for p in (cert, key, client_ca) if p)
        self._cert, self._key, self._client_ca = cert, key, client_ca
        self._stamp = self._stamps()
        self._checked = time.monotonic()

    def _stamps(self) -> tuple[int, ...]:
        return tuple(Path(p).stat().st_mtime_ns for p in self._paths)

    def config(self) -> grpc.ServerCertificateConfiguration:
        key = _read(self._key, "SLUICE_TLS_KEY_FILE")
        cert = _read(self._cert, "SLUICE_TLS_CERT_FILE")
        roots = _read(self._client_ca, "SLUICE_TLS_CLIENT_CA_FILE") if self._client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before handshakes: a new config when the files changed, else None."""
        now = time.monotonic()
        if now - self._checked < _RECHECK_SECONDS:
            return None
        self._checked = now
        try:
            stamp = self._stamps()
            if stamp == self._stamp:
                return None
            config = self.config()
        except (OSError, ConfigError) as exc:
            log.warning("TLS certificate files changed but could not be read: %s", exc)
            return None
        self._stamp = stamp
        log.info("TLS certificate reloaded from %s", self._cert)
        return config


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """Server credentials (None for plaintext when no certificate is configured)."""
    if not cert and not key:
        if client_ca:
            raise ConfigError("SLUICE_TLS_CLIENT_CA_FILE needs SLUICE_TLS_CERT_FILE and _KEY_FILE")
        return None
    if not (cert and key):
        raise ConfigError("SLUICE_TLS_CERT_FILE and SLUICE_TLS_KEY_FILE go together")
    reloading = _ReloadingServerConfig(cert, key, client_ca)
    return grpc.dynamic_ssl_server_credentials(
        reloading.config(), reloading.fetch, require_client_authentication=bool(client_ca)
    )


def channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """Client credentials (None for a plaintext channel when no CA is configured)."""
    if not ca:
        if cert or key:
            raise ConfigError("a client certificate needs SLUICE_SENDER_TLS_CA_FILE too")
        return None
    if bool(cert) != bool(key):
        raise ConfigError("SLUICE_SENDER_TLS_CERT_FILE and _KEY_FILE go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "SLUICE_SENDER_TLS_CA_FILE"),
        private_key=_read(key, "SLUICE_SENDER_TLS_KEY_FILE") if key else None,
        certificate_chain=_read(cert, "SLUICE_SENDER_TLS_CERT_FILE") if cert else None,
    )
