"""The router's instrumentation: the one place that turns rounds, reclaims, the provider
health tracker and the queue sampler's readings into metrics.

Queue gauges come from :class:`QueueSampler`, a supervised task that reads the live queue
every ``interval`` seconds, not from a ``count(*)`` per scrape: see its docstring for cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol
from uuid import UUID

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice.common.db import Executor, db_boundary
from sluice.common.errors import Unavailable
from sluice.common.metrics import LATENCY_BUCKETS, Metrics
from sluice.common.providers import INTENT_KINDS, ProviderConfig
from sluice.v1 import sender_pb2

log = logging.getLogger("sluice.router.metrics")

#: Outcome labels of ``sluice_router_results_total``.
OUTCOMES = (
    "accepted",
    "throttled",
    "transient",
    "permanent",
    "unavailable",
    "unknown",
    "expired",
    "no_provider",
)


class _Leased(Protocol):
    @property
    def id(self) -> UUID: ...
    @property
    def kind(self) -> str: ...


class _Completion(Protocol):
    @property
    def intent_id(self) -> UUID: ...
    @property
    def status(self) -> str: ...
    @property
    def provider(self) -> str | None: ...
    @property
    def attempted(self) -> bool: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def outcome(self) -> int | None: ...


class _Health(Protocol):
    def success_rate(self, provider: str) -> float: ...
    def degraded(self) -> frozenset[str]: ...


class _Shared(Protocol):
    """What the metrics read of :class:`sluice.router.shared_state.SharedState`."""

    @property
    def active(self) -> bool: ...
    @property
    def failures(self) -> int: ...
    @property
    def routers(self) -> int: ...
    @property
    def transitions(self) -> Mapping[tuple[str, str, str], int]: ...


def outcome_of(c: _Completion) -> str:
    """The result label of one completion: the send outcome it carries, else how it was
    decided without sending."""
    if c.outcome is not None:
        return _OUTCOME_LABELS.get(c.outcome, "transient")
    if c.status == "sent":
        return "accepted"
    if c.status == "pending":
        if c.attempted:
            return "transient"
        if c.last_error is None:
            return "throttled"
        return "no_provider" if c.provider is None else "unavailable"
    if c.status == "expired":
        return "expired"
    return "permanent"


_OUTCOME_LABELS: dict[int, str] = {
    sender_pb2.SEND_OUTCOME_ACCEPTED: "accepted",
    sender_pb2.SEND_OUTCOME_THROTTLED: "throttled",
    sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE: "transient",
    sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE: "permanent",
    sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE: "unavailable",
    sender_pb2.SEND_OUTCOME_UNKNOWN: "unknown",
}


class RouterMetrics:
    """Observes what the dispatcher did; reads provider health at scrape time."""

    def __init__(
        self,
        metrics: Metrics,
        providers: Sequence[ProviderConfig],
        health: _Health,
    ) -> None:
        self.enabled = metrics.enabled
        registry = metrics.registry
        self._cost = {p.name: p.cost_per_thousand / 1000.0 for p in providers}
        self.leases = Counter(
            "sluice_router_leases", "Lease statements that took rows.", registry=registry
        )
        self.leased = Counter("sluice_router_leased_intents", "Intents leased.", registry=registry)
        self.round_duration = Histogram(
            "sluice_router_round_duration_seconds",
            "Time of one round: lease, route, send, write back.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.results = Counter(
            "sluice_router_results",
            "Per-intent results written back, by provider and outcome.",
            ["provider", "outcome"],
            registry=registry,
        )
        self.reclaimed = Counter(
            "sluice_router_reclaimed", "Expired leases returned to pending.", registry=registry
        )
        self.deadline_misses = Counter(
            "sluice_router_deadline_misses",
            "Intents that expired before they could be sent, by kind.",
            ["kind"],
            registry=registry,
        )
        self.sends = Counter(
            "sluice_sends",
            "Messages a provider accepted, by provider and intent kind.",
            ["provider", "kind"],
            registry=registry,
        )
        self.cost = Counter(
            "sluice_send_cost_usd",
            "What the accepted messages cost, in US dollars, by provider and intent kind.",
            ["provider", "kind"],
            registry=registry,
        )
        self.queue = Gauge(
            "sluice_queue_intents",
            "Intents in the live queue by status (pending, leased) and kind, sampled.",
            ["status", "kind"],
            registry=registry,
        )
        self.oldest_due = Gauge(
            "sluice_queue_oldest_due_age_seconds",
            "How long the oldest due pending intent of each kind has been due, sampled.",
            ["kind"],
            registry=registry,
        )
        registry.register(_HealthCollector([p.name for p in providers], health))
        self._registry = registry

    def watch_shared_state(self, shared: _Shared) -> None:
        """Exports whether circuits and outages are shared (or local: Redis not answering),
        the failed Redis calls, the routers counted, and the circuit transitions this
        router's syncs made (each transition is counted by one router only)."""
        if self.enabled:
            self._registry.register(_SharedCollector(shared))

    def observe_round(
        self,
        leased: Sequence[_Leased],
        completions: Iterable[_Completion],
        seconds: float,
    ) -> None:
        """Records one round: what was leased and every completion written for it."""
        if not self.enabled:
            return
        kinds = {i.id: i.kind for i in leased}
        self.leases.inc()
        self.leased.inc(len(leased))
        self.round_duration.observe(seconds)
        results: dict[tuple[str, str], int] = {}
        sends: dict[tuple[str, str], int] = {}
        misses: dict[str, int] = {}
        for c in completions:
            outcome = outcome_of(c)
            provider = c.provider or ""
            key = (provider, outcome)
            results[key] = results.get(key, 0) + 1
            kind = kinds.get(c.intent_id, "")
            if outcome == "accepted":
                sends[(provider, kind)] = sends.get((provider, kind), 0) + 1
            elif outcome == "expired":
                misses[kind] = misses.get(kind, 0) + 1
        for (provider, outcome), n in results.items():
            self.results.labels(provider, outcome).inc(n)
        for (provider, kind), n in sends.items():
            self.sends.labels(provider, kind).inc(n)
            self.cost.labels(provider, kind).inc(n * self._cost.get(provider, 0.0))
        for kind, n in misses.items():
            self.deadline_misses.labels(kind).inc(n)

    def observe_reclaimed(self, count: int) -> None:
        """Records expired leases returned to pending."""
        if self.enabled and count:
            self.reclaimed.inc(count)

    def observe_queue(self, sample: QueueSample) -> None:
        """Sets the queue gauges from one sample."""
        for kind in INTENT_KINDS:
            for status in ("pending", "leased"):
                self.queue.labels(status, kind).set(sample.counts.get((status, kind), 0))
            self.oldest_due.labels(kind).set(sample.oldest_due_age.get(kind, 0.0))


class _HealthCollector(Collector):
    """Success ratio and health per provider, read from the tracker at scrape time."""

    def __init__(self, providers: Sequence[str], health: _Health) -> None:
        self._providers = tuple(providers)
        self._health = health

    def collect(self) -> Iterator[Metric]:
        ratio = GaugeMetricFamily(
            "sluice_provider_success_ratio",
            "Rolling share of this router's sends to the provider that it accepted.",
            labels=["provider"],
        )
        healthy = GaugeMetricFamily(
            "sluice_provider_healthy",
            "1 when this router considers the provider healthy, 0 when degraded.",
            labels=["provider"],
        )
        degraded = self._health.degraded()
        for name in self._providers:
            ratio.add_metric([name], self._health.success_rate(name))
            healthy.add_metric([name], 0.0 if name in degraded else 1.0)
        yield ratio
        yield healthy


class _SharedCollector(Collector):
    def __init__(self, shared: _Shared) -> None:
        self._shared = shared

    def collect(self) -> Iterator[Metric]:
        shared = self._shared
        yield GaugeMetricFamily(
            "sluice_router_shared_state_local",
            "1 while this router routes on its own circuits and outage clock because Redis"
            " does not answer, 0 while they are shared.",
            value=0.0 if shared.active else 1.0,
        )
        yield CounterMetricFamily(
            "sluice_router_shared_state_failures",
            "Calls to Redis for shared circuit and outage state that failed or timed out.",
            value=shared.failures,
        )
        yield GaugeMetricFamily(
            "sluice_router_routers",
            "Routers heard from lately; each plans with 1/this of every provider's capacity.",
            value=shared.routers,
        )
        transitions = CounterMetricFamily(
            "sluice_router_circuit_transitions",
            "Circuits this router's syncs opened or closed, for every router.",
            labels=["provider", "kind", "state"],
        )
        for (provider, kind, state), n in sorted(shared.transitions.items()):
            transitions.add_metric([provider, kind or "*", state], n)
        yield transitions


class QueueSample:
    """One reading of the live queue."""

    def __init__(
        self, counts: Mapping[tuple[str, str], int], oldest_due_age: Mapping[str, float]
    ) -> None:
        self.counts = dict(counts)
        self.oldest_due_age = dict(oldest_due_age)


# Both read only the partial indexes of the live queue (pending, leased), never the history
# of sent rows. The counts are index scans over the queue itself: O(queue), not O(table);
# the oldest-due reads are one index probe per kind (priority is the index's first column).
QUEUE_COUNTS_SQL = """
SELECT 'pending' AS status, kind::text AS kind, count(*) AS n
FROM intents WHERE status = 'pending' GROUP BY kind
UNION ALL
SELECT 'leased', kind::text, count(*) FROM intents WHERE status = 'leased' GROUP BY kind
"""
OLDEST_DUE_SQL = """
SELECT k.kind::text AS kind,
       (SELECT extract(epoch FROM now() - min(i.due_at)) FROM intents i
        WHERE i.status = 'pending' AND i.priority = k.priority AND i.due_at <= now()) AS age
FROM (VALUES ('transactional'::intent_kind, 0), ('digest', 1), ('marketing', 2))
     AS k(kind, priority)
"""
#: Only the router holding this advisory lock samples, so R routers cost one query set.
SAMPLER_LOCK_KEY = 0x736C_7569_6365_0002


@db_boundary
async def sample_queue(pool: Executor) -> QueueSample | None:
    """Reads the queue if this process holds the sampler lock (None when another does)."""
    async with _connection(pool) as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SAMPLER_LOCK_KEY):
            return None
        await conn.execute("SET LOCAL statement_timeout = '5s'")
        counts = {(r["status"], r["kind"]): int(r["n"]) for r in await conn.fetch(QUEUE_COUNTS_SQL)}
        ages = {
            r["kind"]: max(0.0, float(r["age"])) if r["age"] is not None else 0.0
            for r in await conn.fetch(OLDEST_DUE_SQL)
        }
    return QueueSample(counts, ages)


@contextlib.asynccontextmanager
async def _connection(pool: Executor):  # type: ignore[no-untyped-def]
    if hasattr(pool, "acquire"):
        async with pool.acquire() as conn:
            yield conn
    else:
        yield pool


async def run_sampler(pool: Executor, metrics: RouterMetrics, *, interval: float = 10.0) -> None:
    """Samples the queue every ``interval`` seconds until cancelled; database outages are
    logged and waited out (the gauges keep their last values)."""
    while True:
        started = time.monotonic()
        try:
            sample = await sample_queue(pool)
        except Unavailable as exc:
            log.warning("queue sample skipped: %s", exc)
        else:
            if sample is not None:
                metrics.observe_queue(sample)
        await asyncio.sleep(max(0.5, interval - (time.monotonic() - started)))
