"""The sender's instrumentation: the one place that turns a batch's grant and results into
metrics (reservations, tokens left, provider call latency, outcomes per provider)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from sluice.common.metrics import LATENCY_BUCKETS, Metrics


class SenderMetrics:
    """Observes the limiter's grants and the providers' answers."""

    def __init__(self, metrics: Metrics) -> None:
        self.enabled = metrics.enabled
        registry = metrics.registry
        self.reservations = Counter(
            "sluice_sender_reservations",
            "Messages asked of the rate limiter, by provider and result (granted or denied).",
            ["provider", "result"],
            registry=registry,
        )
        self.tokens = Gauge(
            "sluice_sender_tokens_remaining",
            "Messages the provider's sustained bucket allowed after the last reservation.",
            ["provider"],
            registry=registry,
        )
        self.call_duration = Histogram(
            "sluice_sender_provider_call_duration_seconds",
            "Time of one adapter call: every provider request for one SendBatch.",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.messages = Counter(
            "sluice_sender_messages",
            "Messages answered by provider and outcome.",
            ["provider", "outcome"],
            registry=registry,
        )

    def observe_grant(self, provider: str, asked: int, granted: int, tokens_left: float) -> None:
        """Records one reservation."""
        if not self.enabled:
            return
        if granted:
            self.reservations.labels(provider, "granted").inc(granted)
        if asked > granted:
            self.reservations.labels(provider, "denied").inc(asked - granted)
        self.tokens.labels(provider).set(tokens_left)

    def observe_call(self, provider: str, seconds: float) -> None:
        """Records one provider API call's duration."""
        if self.enabled:
            self.call_duration.labels(provider).observe(seconds)

    def observe_outcomes(self, provider: str, outcomes: Iterable[str]) -> None:
        """Records a batch's per-message outcomes (accepted, throttled, transient, ...)."""
        if not self.enabled:
            return
        for outcome, n in Tally(outcomes).items():
            self.messages.labels(provider, outcome).inc(n)
