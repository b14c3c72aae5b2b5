"""The router's settings: the common part plus the dispatch knobs only the router reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sluice.common.errors import ConfigError
from sluice.common.settings import CommonSettings
from sluice.router.circuit import CircuitConfig

UNKNOWN_POLICIES = frozenset({"retry", "hold"})


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
    # what an unknown outcome does: "retry" (may send twice to a provider without
    # idempotency keys) or "hold" (wait unknown_hold_seconds for a delivery event first)
    unknown_outcome_policy: str = "retry"
    unknown_hold_seconds: float = 900.0
    # how often a target believed down is probed, and the longest an intent waits for one
    outage_probe_seconds: float = 0.5
    outage_hold_max_seconds: float = 30.0
    # how long an intent with no usable provider waits before it is looked at again
    no_provider_wait_seconds: float = 10.0
    # the most of one lease a single campaign takes while others are due (0 < share <= 1)
    lease_campaign_share: float = 0.5
    circuit_success_threshold: float = 0.98
    circuit_max_latency_seconds: float = 5.0
    circuit_min_samples: int = 50
    circuit_cooldown_seconds: float = 30.0
    # how often a half-open circuit lets one round's batch through, across all routers
    circuit_probe_seconds: float = 1.0
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
        self.require_positive(
            "unknown_hold_seconds",
            "outage_probe_seconds",
            "outage_hold_max_seconds",
            "no_provider_wait_seconds",
            "circuit_max_latency_seconds",
            "circuit_cooldown_seconds",
            "circuit_probe_seconds",
        )
        self.require_at_least(1, "circuit_min_samples")
        if self.unknown_outcome_policy not in UNKNOWN_POLICIES:
            raise ConfigError(
                f"SLUICE_UNKNOWN_OUTCOME_POLICY must be one of {sorted(UNKNOWN_POLICIES)}, "
                f"not {self.unknown_outcome_policy!r}"
            )
        if not 0 < self.lease_campaign_share <= 1:
            raise ConfigError("SLUICE_LEASE_CAMPAIGN_SHARE must be in (0, 1]")
        if not 0 <= self.circuit_success_threshold <= 1:
            raise ConfigError("SLUICE_CIRCUIT_SUCCESS_THRESHOLD must be between 0 and 1")
        if self.sender_timeout_seconds >= self.lease_seconds:
            raise ConfigError(
                "SLUICE_SENDER_TIMEOUT_SECONDS must be shorter than SLUICE_LEASE_SECONDS, "
                "or a lease could expire while its batch is still being sent"
            )

    def circuit(self) -> CircuitConfig:
        """The circuit breakers' bounds these settings describe."""
        return CircuitConfig(
            threshold=self.circuit_success_threshold,
            max_latency=self.circuit_max_latency_seconds,
            min_samples=self.circuit_min_samples,
            cooldown=self.circuit_cooldown_seconds,
            probe_every=self.circuit_probe_seconds,
        )
