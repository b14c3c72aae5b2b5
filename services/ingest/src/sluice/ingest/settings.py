"""Ingest's settings: the common part plus what only ingest reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import ClassVar

from sluice.common.errors import ConfigError
from sluice.common.settings import CommonSettings
from sluice.ingest.webhooks.config import validate_webhook_settings


@dataclass(frozen=True)
class IngestSettings(CommonSettings):
    """Ingest's configuration (``SLUICE_*``); see the README's configuration reference."""

    service: ClassVar[str] = "ingest"

    metrics_port: int = 9091
    ingest_port: int = 50051
    default_deadline_seconds: float = 86_400.0
    #: Largest request message gRPC accepts; a bigger one gets RESOURCE_EXHAUSTED.
    ingest_max_request_bytes: int = 16 * 1024 * 1024
    #: Most intents in one SubmitIntents call or one SubmitIntentStream chunk.
    ingest_max_batch: int = 10_000
    #: Calls worked on at once (each stream counts as one); past it, RESOURCE_EXHAUSTED.
    ingest_max_in_flight_calls: int = 256
    #: Intents held (decoded, validated, being stored) at once; past it, RESOURCE_EXHAUSTED.
    ingest_max_in_flight_intents: int = 40_000
    #: Shed new calls while the event loop runs this many seconds late (0: never).
    ingest_max_loop_lag_seconds: float = 0.1
    #: Shed new calls while more than this many calls wait in gRPC core for the process to
    #: take them up (0: never).
    ingest_max_waiting_calls: int = 100
    #: The retry hint of an overload answer (jittered up by half).
    ingest_retry_after_seconds: float = 0.2
    #: Check each recipient's domain in DNS (blocking lookups, in worker threads).
    ingest_check_deliverability: bool = False
    #: Most pending intents one campaign may have (0: no limit).
    ingest_max_pending_per_campaign: int = 0
    #: Per-kind deadline windows (seconds from the later of now and send_at) for intents
    #: that name no deadline; 0 means default_deadline_seconds.
    deadline_transactional_seconds: float = 0.0
    deadline_marketing_seconds: float = 0.0
    deadline_digest_seconds: float = 0.0
    #: Budget of one PreviewTemplate render, and how many render at once.
    preview_timeout_seconds: float = 0.5
    preview_max_chars: int = 1_000_000
    preview_concurrency: int = 2
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
    watch_max_streams: int = 256

    def validate(self) -> None:
        super().validate()
        self.require_port("ingest_port")
        self.require_positive(
            "default_deadline_seconds",
            "ingest_max_request_bytes",
            "ingest_max_batch",
            "ingest_max_in_flight_calls",
            "ingest_max_in_flight_intents",
            "ingest_retry_after_seconds",
        )
        self.require_at_least(
            0,
            "ingest_max_pending_per_campaign",
            "ingest_max_loop_lag_seconds",
            "ingest_max_waiting_calls",
        )
        if self.ingest_max_request_bytes > 1024**3:
            raise ConfigError("SLUICE_INGEST_MAX_REQUEST_BYTES must be at most 1 GiB")
        self.require_positive("default_deadline_seconds")
        self.require_at_least(
            0,
            "deadline_transactional_seconds",
            "deadline_marketing_seconds",
            "deadline_digest_seconds",
        )
        self.require_positive("preview_timeout_seconds", "preview_max_chars", "preview_concurrency")
        validate_webhook_settings(self)

    def deadline_windows(self) -> dict[str, timedelta]:
        """The default deadline window of each intent kind."""
        windows = {
            "transactional": self.deadline_transactional_seconds,
            "marketing": self.deadline_marketing_seconds,
            "digest": self.deadline_digest_seconds,
        }
        return {
            kind: timedelta(seconds=seconds or self.default_deadline_seconds)
            for kind, seconds in windows.items()
        }
