"""The webhook endpoint's configuration, checked at start-up.

Read from IngestSettings (``SLUICE_WEBHOOK_*``, ``SLUICE_SES_TOPIC_ARNS``, ...; see the
README's configuration reference). A provider whose secret or key is not set has its path
answer 404: nothing unsigned is ever accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from sluice.common.errors import ConfigError
from sluice.ingest.webhooks import sendgrid_sig, svix


@dataclass(frozen=True)
class WebhookConfig:
    """Decoded, validated webhook settings."""

    max_body_bytes: int = 1_048_576
    tolerance: float = 300.0
    ses_topics: frozenset[str] = frozenset()
    sns_max_age: float = 3600.0
    resend_keys: tuple[bytes, ...] = ()
    sendgrid_key: ec.EllipticCurvePublicKey | None = None
    raw_retention_days: float = 30.0
    soft_bounce_limit: int = 3
    soft_bounce_window: float = 604_800.0
    complaint_rate_threshold: float = 0.001
    bounce_rate_threshold: float = 0.02
    guard_window: float = 86_400.0
    guard_min_volume: int = 200
    guard_check_seconds: float = 10.0
    unsubscribe_secret: bytes = b""
    watch_max_streams: int = 256


def _split(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part]


def from_settings(s: Any) -> WebhookConfig:
    """The config for IngestSettings ``s``; ConfigError naming the variable when bad."""
    try:
        resend_keys = tuple(svix.decode_secret(k) for k in _split(s.resend_webhook_secret))
    except ValueError as exc:
        raise ConfigError(f"SLUICE_RESEND_WEBHOOK_SECRET: {exc}") from None
    sendgrid_key = None
    if s.sendgrid_webhook_public_key:
        try:
            sendgrid_key = sendgrid_sig.load_public_key(s.sendgrid_webhook_public_key)
        except ValueError as exc:
            raise ConfigError(f"SLUICE_SENDGRID_WEBHOOK_PUBLIC_KEY: {exc}") from None
    topics = frozenset(_split(s.ses_topic_arns))
    for topic in topics:
        if not topic.startswith("arn:aws") or topic.count(":") != 5:
            raise ConfigError(f"SLUICE_SES_TOPIC_ARNS: {topic!r} is not an SNS topic ARN")
    secret = s.unsubscribe_secret.encode()
    if secret and len(secret) < 32:
        raise ConfigError("SLUICE_UNSUBSCRIBE_SECRET must be at least 32 characters")
    return WebhookConfig(
        max_body_bytes=s.webhook_max_body_bytes,
        tolerance=s.webhook_tolerance_seconds,
        ses_topics=topics,
        sns_max_age=s.sns_max_age_seconds,
        resend_keys=resend_keys,
        sendgrid_key=sendgrid_key,
        raw_retention_days=s.event_raw_retention_days,
        soft_bounce_limit=s.soft_bounce_limit,
        soft_bounce_window=s.soft_bounce_window_seconds,
        complaint_rate_threshold=s.complaint_rate_threshold,
        bounce_rate_threshold=s.bounce_rate_threshold,
        guard_window=s.guard_window_seconds,
        guard_min_volume=s.guard_min_volume,
        guard_check_seconds=s.guard_check_seconds,
        unsubscribe_secret=secret,
        watch_max_streams=s.watch_max_streams,
    )


def validate_webhook_settings(s: Any) -> None:
    """Range checks for IngestSettings.validate(); raises ConfigError."""
    s.require_port("webhook_port", allow_off=True)
    s.require_at_least(1024, "webhook_max_body_bytes")
    s.require_positive(
        "webhook_tolerance_seconds",
        "sns_max_age_seconds",
        "event_raw_retention_days",
        "soft_bounce_window_seconds",
        "complaint_rate_threshold",
        "bounce_rate_threshold",
        "guard_window_seconds",
        "guard_check_seconds",
        "unsubscribe_ttl_days",
    )
    s.require_at_least(1, "soft_bounce_limit", "guard_min_volume", "watch_max_streams")
    if s.unsubscribe_base_url and not s.unsubscribe_base_url.startswith(("https://", "http://")):
        raise ConfigError("SLUICE_UNSUBSCRIBE_BASE_URL must be an http(s) URL")
    from_settings(s)
