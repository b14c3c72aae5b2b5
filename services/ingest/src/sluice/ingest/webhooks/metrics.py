"""What the webhook endpoint counts, on ingest's Prometheus registry. Labels never carry
addresses or secrets."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class WebhookMetrics:
    """Counters for requests and events, gauges for the deliverability guards."""

    def __init__(self, registry: CollectorRegistry) -> None:
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
