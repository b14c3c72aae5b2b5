"""The sender's settings: the common part plus what only the sender reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sluice.common.errors import ConfigError
from sluice.common.settings import CommonSettings


@dataclass(frozen=True)
class SenderSettings(CommonSettings):
    """The sender's configuration (``SLUICE_*``); see the README's configuration reference."""

    service: ClassVar[str] = "sender"

    metrics_port: int = 9093
    sender_port: int = 50053
    # Comma-separated domains the from-address may use; empty allows any valid address.
    sender_from_domains: str = ""
    render_workers: int = 2
    render_timeout_seconds: float = 0.5
    render_batch_timeout_seconds: float = 5.0
    render_max_output_chars: int = 1_000_000
    render_memory_mb: int = 512

    def validate(self) -> None:
        super().validate()
        self.require_port("sender_port")
        self.require_at_least(1, "render_workers", "render_max_output_chars")
        self.require_at_least(64, "render_memory_mb")
        self.require_positive("render_timeout_seconds", "render_batch_timeout_seconds")
        if self.render_timeout_seconds > self.render_batch_timeout_seconds:
            raise ConfigError(
                "SLUICE_RENDER_TIMEOUT_SECONDS must not exceed SLUICE_RENDER_BATCH_TIMEOUT_SECONDS"
            )
        for domain in self.from_domains():
            if not domain or any(c in domain for c in " @<>"):
                raise ConfigError(f"SLUICE_SENDER_FROM_DOMAINS: {domain!r} is not a domain")

    def from_domains(self) -> frozenset[str]:
        """The from-address domains allowed, lower-cased ASCII (IDNA)."""
        return frozenset(
            d.strip().lower().encode("idna").decode("ascii")
            for d in self.sender_from_domains.split(",")
            if d.strip()
        )
