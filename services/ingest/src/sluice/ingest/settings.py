"""Ingest's settings: the common part plus what only ingest reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from sluice.common.settings import CommonSettings
from sluice.ingest.webhooks.config import validate_webhook_settings


@dataclass(frozen=True)
class IngestSettings(CommonSettings):
    """Ingest's configuration (``SLUICE_*``); see the README's configuration reference."""

    service: ClassVar[str] = "ingest"

    metrics_port: int = 9091
    ingest_port: int = 50051
    default_deadline_seconds: float = 86_400.0
    # Delivery webhooks and one-click unsubscribe (checked in sluice.ingest.webhooks.config).
    webhook_port: int = 8080
    webhook_max_body_bytes: int = 1_048_576
    webhook_tolerance_seconds: float = 300.0
    ses_topic_arns: str = ""
    sns_max_age_seconds: float = 3600.0
    resend_webhook_secret: str = field(default="", repr=False)  # a secret: never printed
    sendgrid_webhook_public_key: str = ""
    event_raw_retention_days: float = 30.0
    soft_bounce_limit: int = 3
    soft_bounce_window_seconds: float = 604_800.0
    complaint_rate_threshold: float = 0.001
    bounce_rate_threshold: float = 0.02
    guard_window_seconds: float = 86_400.0
    guard_min_volume: int = 200
    guard_check_seconds: float = 10.0
    unsubscribe_secret: str = field(default="", repr=False)  # a secret: never printed
    unsubscribe_base_url: str = ""
    unsubscribe_ttl_days: float = 90.0
    watch_max_streams: int = 256

    def validate(self) -> None:
        super().validate()
        self.require_port("ingest_port")
        self.require_positive("default_deadline_seconds")
        validate_webhook_settings(self)
