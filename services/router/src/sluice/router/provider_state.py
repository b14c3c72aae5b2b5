"""Everything the router learns from outcomes, in one place: per-provider health and circuit
breakers, which targets are unreachable and for how long, throttle pacing, and counters.

The dispatcher hands every :class:`~sluice.router.sender_client.BatchOutcome` to
:meth:`ProviderState.observe` and asks it how to time what comes back
(:meth:`ProviderState.timing`); routing asks it which providers to avoid
(:meth:`ProviderState.avoid`); ListProviders and the metrics read it.

Outages are timed, not counted: an intent that could not be handed over waits in
proportion to how long its target has been down (at least ``probe_interval``, at most
``hold_max``), and the dispatcher probes a target it believes down every
``probe_interval``; the first answer releases every intent held for it. A 2-second sender
restart thus delays mail by about 2 seconds, not by a backoff that grew per failed batch.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta

from sluice.common.providers import ProviderConfig
from sluice.router.circuit import CircuitBreakers
from sluice.router.health import ProviderHealthTracker
from sluice.router.outcomes import SENDER_TARGET, Timing
from sluice.router.pacing import Pacer
from sluice.router.sender_client import BatchOutcome, outcome_name
from sluice.v1 import sender_pb2

__all__ = ["OutageClock", "ProviderState"]

_ACCEPTED = sender_pb2.SEND_OUTCOME_ACCEPTED
_UNAVAILABLE = sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE
_THROTTLED = sender_pb2.SEND_OUTCOME_THROTTLED
_PERMANENT = sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE


class OutageClock:
    """When each unreachable target went down, by this router's monotonic clock."""

    def __init__(
        self,
        *,
        probe_interval: float,
        hold_max: float,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe_interval = probe_interval
        self.hold_max = max(hold_max, probe_interval)
        self._rng = rng
        self._clock = clock
        self._down_since: dict[str, float] = {}

    def down(self, target: str) -> None:
        """Notes that ``target`` could not be reached (keeps the first time it was seen)."""
        self._down_since.setdefault(target, self._clock())

    def up(self, target: str) -> bool:
        """Notes that ``target`` answered; True when it was down until now."""
        return self._down_since.pop(target, None) is not None

    def is_down(self, target: str) -> bool:
        """Whether ``target`` is believed down."""
        return target in self._down_since

    def targets(self) -> list[str]:
        """The targets believed down, longest-down first."""
        return sorted(self._down_since, key=self._down_since.__getitem__)

    def hold_seconds(self, target: str) -> float:
        """How long an intent waits for ``target``: about as long as the outage has lasted,
        jittered, within ``[probe_interval, hold_max]``. A probe releases it earlier."""
        since = self._down_since.get(target)
        lasted = 0.0 if since is None else self._clock() - since
        ceiling = min(self.hold_max, max(self.probe_interval, lasted))
        return self._rng.uniform(max(self.probe_interval, ceiling / 2), ceiling)


class ProviderState:
    """The router's view of every provider, fed by outcomes. One event loop, no locks."""

    def __init__(
        self,
        providers: Iterable[ProviderConfig],
        *,
        health: ProviderHealthTracker,
        circuits: CircuitBreakers,
        pacer: Pacer,
        outages: OutageClock,
    ) -> None:
        self.providers: Mapping[str, ProviderConfig] = {p.name: p for p in providers}
        self.health = health
        self.circuits = circuits
        self.pacer = pacer
        self.outages = outages
        # (provider, outcome name) -> messages; what the metrics seam reads
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.batches: Counter[str] = Counter()
        self.cost: dict[str, float] = {}

    def observe(self, outcome: BatchOutcome, kind: str = "") -> list[str]:
        """Takes in one SendBatch call's outcome; returns the targets that answered again
        after being down (their held intents can be released)."""
        provider = outcome.provider
        self.batches[provider] += 1
        counts = Counter(m.outcome for m in outcome.messages.values())
        for value, n in counts.items():
            self.outcomes[(provider, outcome_name(value))] += n
        recovered: list[str] = []
        if not outcome.sender_reached:
            self.outages.down(SENDER_TARGET)
            return recovered
        if self.outages.up(SENDER_TARGET):
            recovered.append(SENDER_TARGET)
        total = sum(counts.values())
        if total and counts[_UNAVAILABLE] == total:
            # Unreachable is the outage clock's business (hold, probe, release), not the
            # circuit's: an open circuit would keep traffic away for its whole cool-down
            # after the outage ended (seen with a 1.5 s Redis restart: 30 s of waiting).
            self.outages.down(provider)
            return recovered
        accepted = counts[_ACCEPTED]
        if accepted and self.outages.up(provider):
            recovered.append(provider)
        config = self.providers.get(provider)
        if config is not None and accepted:
            spent = accepted * config.cost_per_thousand / 1000.0
            self.cost[provider] = self.cost.get(provider, 0.0) + spent
        # Throttling says the limiter works and a permanent failure says the message is bad;
        # neither says anything about the provider. Everything else counts against it.
        neutral = counts[_THROTTLED] + counts[_PERMANENT] + counts[_UNAVAILABLE]
        failed = total - accepted - neutral
        self.health.record(provider, accepted=accepted, failed=failed)
        self.circuits.record(provider, kind, ok=accepted, failed=failed, seconds=outcome.seconds)
        return recovered

    def avoid(self, kind: str | None = None) -> frozenset[str]:
        """Providers routing should avoid now: circuit open (for ``kind``, or for any kind
        when None) or unreachable."""
        down = {name for name in self.providers if self.outages.is_down(name)}
        return frozenset(down | self.circuits.open_providers(kind))

    async def timing(self, outcome: BatchOutcome, now: datetime, paced: int) -> Timing:
        """Due times for the ``paced`` throttled messages of ``outcome`` (reserved from the
        pacer in one go, so they follow one another at the provider's rate) and holds."""
        throttled = min(paced, outcome.count(_THROTTLED))
        slots: list[datetime] = []
        if throttled:
            earliest = now + timedelta(
                seconds=min(
                    (m.retry_after for m in outcome.messages.values() if m.outcome == _THROTTLED),
                    default=0.0,
                )
            )
            slots = await self.pacer.reserve(outcome.provider, earliest, throttled)
        slots.reverse()

        def throttle_due(provider: str, earliest: datetime) -> datetime:
            return max(slots.pop(), earliest) if slots else earliest

        return Timing(throttle_due=throttle_due, hold_seconds=self.outages.hold_seconds)
