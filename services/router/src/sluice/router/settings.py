"""The router's settings: the common part plus the dispatch knobs only the router reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sluice.common.errors import ConfigError
from sluice.common.settings import CommonSettings


@dataclass(frozen=True)
class RouterSettings(CommonSettings):
    """The router's configuration (``SLUICE_*``); see the README's configuration reference."""

    service: ClassVar[str] = "router"

    metrics_port: int = 9092
    router_port: int = 50052
    sender_target: str = "127.0.0.1:50053"
    router_batch_size: int = 500
    router_concurrency: int = 4
    router_idle_sleep: float = 0.2
    lease_seconds: float = 30.0
    max_attempts: int = 8
    retry_base_seconds: float = 5.0
    retry_max_seconds: float = 600.0
    sender_timeout_seconds: float = 10.0
    #: File holding the token (scope ``send``) the router presents to senders.
    sender_token_file: str = ""
    #: CA that signed the senders' certificates: the channel to senders uses TLS.
    sender_tls_ca_file: str = ""
    #: The router's client certificate and key, for senders that require mutual TLS.
    sender_tls_cert_file: str = ""
    sender_tls_key_file: str = ""

    def validate(self) -> None:
        super().validate()
        self.require_port("router_port")
        self.require_at_least(1, "router_batch_size", "router_concurrency", "max_attempts")
        self.require_positive("lease_seconds", "sender_timeout_seconds", "retry_base_seconds")
        if self.sender_timeout_seconds >= self.lease_seconds:
            raise ConfigError(
                "SLUICE_SENDER_TIMEOUT_SECONDS must be shorter than SLUICE_LEASE_SECONDS, "
                "or a lease could expire while its batch is still being sent"
            )
