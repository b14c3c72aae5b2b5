"""A compressed-time simulation of the router in front of sandbox-like providers.

Each tick (0.1 simulated seconds) the simulated router leases up to 500 due intents,
transactional first, then digest, then marketing (as the real lease orders them), asks a
routing strategy where each goes, and hands each to its provider. A provider is a token
bucket (its burst and sustained rate): with a token the message is accepted, or answered
with a 5xx during an outage (the token is spent: the request was made); without one it is
throttled. What happens next is the real router's code: throttled intents come back at the
slot :class:`sluice.router.pacing.LocalPacer` gives them (no attempt spent), failed ones
after :class:`sluice.router.outcomes.RetryPolicy`'s full-jitter backoff, until the attempts
run out; an intent leased after its deadline expires.

Strategies: ``sluice`` is the real :func:`sluice.router.policy.decide`, with a small circuit
breaker standing in for the router's provider state; ``cheapest-first`` is the seed's
(cheapest provider serving the kind, always); ``round-robin`` rotates over the providers
serving the kind. The baselines have no breaker, like the seed.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from bench.routing.scenario import ProviderSpec, Scenario
from sluice.router.outcomes import RetryPolicy
from sluice.router.pacing import LocalPacer as ThrottlePacer
from sluice.router.policy import (
    PRIORITY,
    Demand,
    PlanState,
    ProviderState,
    Verdict,
    decide,
)

TICK = 0.1
LEASE = 500
RETRY = RetryPolicy(max_attempts=8, base_seconds=5.0, max_seconds=600.0)  # router defaults
EPOCH = datetime(2030, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class SimIntent:
    """One intent's row, as far as routing cares."""

    id: int
    kind: str
    submitted: float
    deadline: float
    due: float
    attempts: int = 0
    provider: str | None = None
    sent_at: float | None = None


Route = tuple[Verdict, str | None, float]  # verdict, provider, retry_at
Strategy = Callable[[Sequence[SimIntent], float], list[Route]]


class Breaker:
    """Per provider: open when at least 20 of the last 50 sends and under 90 % accepted;
    closed again after a cool-down (10 s, doubling to 30 s while probes fail)."""

    def __init__(self) -> None:
        self.window: dict[str, deque[bool]] = {}
        self.open_until: dict[str, float] = {}
        self.cooldown: dict[str, float] = {}
        self.probing: set[str] = set()

    def record(self, provider: str, ok: bool, now: float) -> None:
        if provider in self.probing:
            self.probing.discard(provider)
            if ok:
                self.cooldown.pop(provider, None)
                self.window.pop(provider, None)
            else:
                self._open(provider, now)
            return
        window = self.window.setdefault(provider, deque(maxlen=50))
        window.append(ok)
        if len(window) >= 20 and sum(window) / len(window) < 0.9:
            self._open(provider, now)

    def _open(self, provider: str, now: float) -> None:
        wait = min(30.0, self.cooldown.get(provider, 5.0) * 2)
        self.cooldown[provider] = wait
        self.open_until[provider] = now + wait
        self.window.pop(provider, None)

    def opened(self, now: float) -> dict[str, float]:
        """Open circuits and when each may be probed; a cool-down that ended half-opens."""
        for name, until in list(self.open_until.items()):
            if until <= now:
                del self.open_until[name]
                self.probing.add(name)
        return dict(self.open_until)


def sluice_strategy(providers: Sequence[ProviderSpec], breaker: Breaker) -> Strategy:
    """The real policy, its plan kept between leases as the router keeps it."""
    plan = PlanState()

    def route(batch: Sequence[SimIntent], now: float) -> list[Route]:
        nonlocal plan
        opened = breaker.opened(now)
        states = [
            ProviderState(
                name=p.name,
                cost_per_thousand=p.cost_per_thousand,
                sustained_rate=p.sustained_rate,
                burst=p.burst,
                intents=p.intents,
                circuit_open=p.name in opened,
                available_at=opened.get(p.name),
            )
            for p in providers
        ]
        demands = [Demand(i.kind, i.deadline, i.due, planned_provider=i.provider) for i in batch]
        decisions, plan = decide(demands, states, plan, now=now)
        return [(d.verdict, d.provider, d.retry_at) for d in decisions]

    return route


def cheapest_first(providers: Sequence[ProviderSpec]) -> Strategy:
    """The seed's choice: the cheapest provider serving the kind, whatever its state."""
    ordered = sorted(providers, key=lambda p: (p.cost_per_thousand, p.name))

    def route(batch: Sequence[SimIntent], now: float) -> list[Route]:
        out: list[Route] = []
        for i in batch:
            p = next((p for p in ordered if i.kind in p.intents), None)
            out.append((Verdict.ROUTE, p.name, 0.0) if p else (Verdict.NEVER, None, 0.0))
        return out

    return route


def round_robin(providers: Sequence[ProviderSpec]) -> Strategy:
    """Each intent to the next provider serving its kind, in turn."""
    cycles = {
        kind: itertools.cycle([p.name for p in providers if kind in p.intents]) for kind in PRIORITY
    }

    def route(batch: Sequence[SimIntent], now: float) -> list[Route]:
        return [(Verdict.ROUTE, next(cycles[i.kind]), 0.0) for i in batch]

    return route


@dataclass
class Outcome:
    """What one strategy did with one scenario."""

    submitted: int = 0
    sent: int = 0
    cost: float = 0.0
    misses: Counter[str] = field(default_factory=Counter)
    tx_latencies: list[float] = field(default_factory=list)
    lost: int = 0
    duplicates: int = 0
    by_provider: Counter[str] = field(default_factory=Counter)

    @property
    def per_thousand(self) -> float:
        """US dollars per 1,000 sent."""
        return self.cost * 1000 / self.sent if self.sent else 0.0

    @property
    def tx_p95(self) -> float:
        """Transactional submission-to-acceptance, 95th percentile, seconds."""
        if not self.tx_latencies:
            return 0.0
        ordered = sorted(self.tx_latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class _Bucket:
    def __init__(self, spec: ProviderSpec) -> None:
        self.rate = spec.sustained_rate
        self.burst = float(spec.burst or math.inf)
        self.tokens = self.burst

    def refill(self, dt: float) -> None:
        self.tokens = min(self.burst, self.tokens + self.rate * dt)

    def take(self) -> bool:
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def retry_after(self) -> float:
        return (1 - self.tokens) / self.rate if self.rate > 0 else 0.0


def simulate(scenario: Scenario, name: str, seed: int = 1) -> Outcome:
    """Runs ``scenario`` with strategy ``name`` (sluice, cheapest-first, round-robin)."""
    rng = random.Random(seed)
    providers = scenario.providers
    breaker = Breaker()
    strategy = {
        "sluice": lambda: sluice_strategy(providers, breaker),
        "cheapest-first": lambda: cheapest_first(providers),
        "round-robin": lambda: round_robin(providers),
    }[name]()
    costs = {p.name: p.cost_per_thousand / 1000 for p in providers}
    buckets = {p.name: _Bucket(p) for p in providers}
    pacer = ThrottlePacer({p.name: p.sustained_rate for p in providers}, max_spread=600.0)
    result = Outcome(submitted=len(scenario.arrivals))
    queues: dict[str, list[tuple[float, int, SimIntent]]] = {k: [] for k in PRIORITY}
    arrivals = iter(
        SimIntent(n, a.kind, a.at, a.deadline, a.at) for n, a in enumerate(scenario.arrivals)
    )
    upcoming = next(arrivals, None)
    open_count = 0
    step = 0
    while True:
        now = step * TICK
        step += 1
        while upcoming is not None and upcoming.submitted <= now:
            heapq.heappush(queues[upcoming.kind], (upcoming.due, upcoming.id, upcoming))
            open_count += 1
            upcoming = next(arrivals, None)
        if upcoming is None and open_count == 0:
            break
        if now > scenario.horizon + 1:
            for queue in queues.values():
                for _, _, i in queue:
                    result.misses[i.kind] += 1  # still open past every deadline: expires
                    open_count -= 1
            break
        for bucket in buckets.values():
            bucket.refill(TICK)
        batch: list[SimIntent] = []
        for kind in sorted(queues, key=PRIORITY.__getitem__):
            queue = queues[kind]
            while queue and queue[0][0] <= now and len(batch) < LEASE:
                batch.append(heapq.heappop(queue)[2])
        live = []
        for i in batch:
            if i.deadline <= now:
                result.misses[i.kind] += 1
                open_count -= 1
            else:
                live.append(i)
        for i, (verdict, provider, retry_at) in zip(live, strategy(live, now), strict=True):
            back: float | None = None
            if verdict is Verdict.NEVER:
                result.misses[i.kind] += 1
            elif verdict is Verdict.WAIT:
                back = retry_at
                i.provider = provider or i.provider
            else:
                assert provider is not None
                i.provider = provider
                bucket = buckets[provider]
                if not bucket.take():
                    at = EPOCH + timedelta(
                        seconds=now + RETRY.throttle_delay(bucket.retry_after(), rng)
                    )
                    back = (pacer.due_at(provider, at) - EPOCH).total_seconds()
                elif scenario.failing(provider, now):
                    breaker.record(provider, False, now)
                    i.attempts += 1
                    if i.attempts >= RETRY.max_attempts:
                        result.misses[i.kind] += 1
                    else:
                        back = now + RETRY.backoff(i.attempts - 1, rng)
                else:
                    breaker.record(provider, True, now)
                    if i.sent_at is not None:
                        result.duplicates += 1
                    i.sent_at = now
                    result.sent += 1
                    result.cost += costs[provider]
                    result.by_provider[provider] += 1
                    if i.kind == "transactional":
                        result.tx_latencies.append(now - i.submitted)
            if back is None:
                open_count -= 1
            else:
                i.due = back
                heapq.heappush(queues[i.kind], (back, i.id, i))
    result.lost = result.submitted - result.sent - sum(result.misses.values()) - open_count
    return result
