"""Ingest's instrumentation: the one place that turns submission outcomes into metrics."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import Counter, Gauge

from sluice.common.metrics import Metrics


class IngestMetrics:
    """Counts submissions by outcome and rejections by reason (``ErrorInfo.reason``)."""

    def __init__(self, metrics: Metrics, deadline_budgets: dict[str, float] | None = None) -> None:
        self.enabled = metrics.enabled
        self.intents = Counter(
            "sluice_ingest_intents",
            "Submitted intents by outcome: created, duplicate (idempotent retry) or rejected.",
            ["outcome"],
            registry=metrics.registry,
        )
        self.rejections = Counter(
            "sluice_ingest_rejections",
            "Rejected submissions by reason.",
            ["reason"],
            registry=metrics.registry,
        )
        budget = Gauge(
            "sluice_queue_deadline_budget_seconds",
            "The default deadline budget of each intent kind (for the oldest-due alert).",
            ["kind"],
            registry=metrics.registry,
        )
        for kind, seconds in (deadline_budgets or {}).items():
            budget.labels(kind).set(seconds)
        self._by_outcome = {o: self.intents.labels(o) for o in ("created", "duplicate", "rejected")}

    def observe_submissions(
        self, *, created: int = 0, duplicate: int = 0, rejected_reasons: Iterable[str] = ()
    ) -> None:
        """Records one call's outcome (a unary call is a batch of one)."""
        if not self.enabled:
            return
        if created:
            self._by_outcome["created"].inc(created)
        if duplicate:
            self._by_outcome["duplicate"].inc(duplicate)
        reasons = Tally(rejected_reasons)
        if reasons:
            self._by_outcome["rejected"].inc(sum(reasons.values()))
            for reason, n in reasons.items():
                self.rejections.labels(reason).inc(n)
