"""What the webhook endpoint counts, on a Prometheus registry (the default one unless a test
passes its own). Labels never carry addresses or secrets."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.registry import REGISTRY


class WebhookMetrics:
    """Counters for requests and events, gauges for the deliverability guards."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.requests = Counter(
            "sluice_webhook_requests",
            "Webhook requests by source and outcome (accepted, duplicate, forged, stale, ...)",
            ["source", "outcome"],
            registry=registry,
        )
        self.events = Counter(
            "sluice_webhook_events",
            "Delivery events stored, by source and type",
            ["source", "type"],
            registry=registry,
        )
        self.suppressed = Counter(
            "sluice_suppressions_added",
            "Addresses suppressed from delivery events, by source",
            ["source"],
            registry=registry,
        )
        self.guard_tripped = Gauge(
            "sluice_provider_guard_tripped",
            "1 while a provider's complaint or bounce rate is over its threshold",
            ["provider", "guard"],
            registry=registry,
        )
        self.guard_rate = Gauge(
            "sluice_provider_guard_rate",
            "A provider's complaint or bounce rate over the guard window",
            ["provider", "guard"],
            registry=registry,
        )

    def request(self, source: str, outcome: str) -> None:
        """Counts one request's outcome."""
        self.requests.labels(source, outcome).inc()


_default: WebhookMetrics | None = None


def default_metrics() -> WebhookMetrics:
    """The process's metrics on the default registry (created once: a registry refuses the
    same metric twice)."""
    global _default
    if _default is None:
        _default = WebhookMetrics()
    return _default
