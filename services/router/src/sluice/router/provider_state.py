"""Everything the router learns from outcomes, in one place: per-provider health and circuit
breakers, which targets are unreachable and for how long, throttle pacing, and counters.

The dispatcher hands every :class:`~sluice.router.sender_client.BatchOutcome` to
:meth:`ProviderState.observe` and asks it how to time what comes back
(:meth:`ProviderState.timing`); routing asks it, once per round, which providers each kind
must avoid and what share of their capacity to plan with (:meth:`ProviderState.view`);
ListProviders and the metrics read it.

With Redis, circuits, outage clocks and probes are shared by every router
(:mod:`sluice.router.shared_state`); this router's own circuits and outage clock are fed all
the same, and decide whenever Redis does not answer.

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
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sluice.common.providers import ProviderConfig
from sluice.router.circuit import CircuitBreakers, CircuitState
from sluice.router.health import ProviderHealthTracker
from sluice.router.outcomes import SENDER_TARGET, Timing
from sluice.router.pacing import Pacer
from sluice.router.sender_client import BatchOutcome, outcome_name
from sluice.v1 import sender_pb2

if TYPE_CHECKING:
    from sluice.router.shared_state import SharedState

__all__ = ["OutageClock", "ProviderState", "RoundView"]

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

    def assume(self, target: str, lasted: float) -> None:
        """Takes it that ``target`` has been down for ``lasted`` seconds (another router,
        or Redis, knew first)."""
        self._down_since[target] = self._clock() - max(lasted, 0.0)

    def replace(self, lasted: Mapping[str, float]) -> None:
        """Takes it that exactly the targets of ``lasted`` are down, each for that long."""
        now = self._clock()
        self._down_since = {t: now - max(s, 0.0) for t, s in lasted.items()}

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


@dataclass(frozen=True, slots=True)
class RoundView:
    """What routing needs of the providers for one round: per intent kind, the providers it
    must avoid and why ("circuit open", "unreachable"), and the share of every provider's
    capacity this router plans with (1/R of R routers)."""

    avoid: Mapping[str, Mapping[str, str]]
    share: float = 1.0


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
        shared: SharedState | None = None,
    ) -> None:
        self.providers: Mapping[str, ProviderConfig] = {p.name: p for p in providers}
        self.health = health
        self.circuits = circuits
        self.pacer = pacer
        self.outages = outages
        self.shared = shared
        # (provider, outcome name) -> messages; what the metrics seam reads
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.batches: Counter[str] = Counter()
        self.cost: dict[str, float] = {}

    async def observe(self, outcome: BatchOutcome, kind: str = "") -> list[str]:
        """Takes in one SendBatch call's outcome; returns the targets that answered again
        after being down (their held intents are this router's to release)."""
        provider = outcome.provider
        self.batches[provider] += 1
        counts = Counter(m.outcome for m in outcome.messages.values())
        for value, n in counts.items():
            self.outcomes[(provider, outcome_name(value))] += n
        recovered: list[str] = []
        if not outcome.sender_reached:
            await self._down(SENDER_TARGET)
            return recovered
        if await self._up(SENDER_TARGET):
            recovered.append(SENDER_TARGET)
        total = sum(counts.values())
        if total and counts[_UNAVAILABLE] == total:
            # Unreachable is the outage clock's business (hold, probe, release), not the
            # circuit's: an open circuit would keep traffic away for its whole cool-down
            # after the outage ended (seen with a 1.5 s Redis restart: 30 s of waiting).
            await self._down(provider)
            return recovered
        accepted = counts[_ACCEPTED]
        if accepted and await self._up(provider):
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
        if self.shared is not None:
            self.shared.record(provider, kind, ok=accepted, failed=failed, seconds=outcome.seconds)
        return recovered

    async def _down(self, target: str) -> None:
        self.outages.down(target)
        shared = self.shared
        if shared is not None and shared.active and not shared.outages.is_down(target):
            await shared.down(target)

    async def _up(self, target: str) -> bool:
        was_down = self.outages.up(target)
        shared = self.shared
        if shared is None:
            return was_down
        knew = shared.active and shared.outages.is_down(target)
        if not (knew or was_down):
            return False  # the common case: no Redis call
        first = await shared.up(target)
        if first is None:  # Redis away: this router's own clock decides
            return was_down
        # Released by whichever router Redis answers first; or by this one, when Redis never
        # learnt of the outage (this router saw it while Redis was away).
        return first or (was_down and not knew)

    async def view(self, kinds: Iterable[str]) -> RoundView:
        """The providers each of ``kinds`` must avoid now, and this router's share. With
        Redis, one round trip that also hands this router the half-open probes that are
        free (at most one router per probe interval)."""
        wanted = tuple(dict.fromkeys(kinds))
        shared = self.shared
        synced = await shared.sync(wanted) if shared is not None else None
        avoid: dict[str, dict[str, str]] = {}
        if shared is not None and synced is not None:
            down = {p for p in self.providers if shared.outages.is_down(p)}
            for t in self.outages.targets():
                if not shared.outages.is_down(t):
                    self.outages.up(t)  # answered for another router: keep in step
            for kind in wanted:
                closed = {p for p in self.providers if (p, "") in synced.closed}
                closed |= {p for p in self.providers if (p, kind) in synced.closed}
                avoid[kind] = _why(down, closed)
        else:
            down = {p for p in self.providers if self.outages.is_down(p)}
            for kind in wanted:
                avoid[kind] = _why(down, self.circuits.open_providers(kind))
        return RoundView(avoid=avoid, share=1.0 / shared.routers if shared is not None else 1.0)

    async def probe_targets(self) -> list[str]:
        """The targets this router should probe now: with Redis, the down ones no other
        router is probing this interval; else every one this router believes down."""
        if self.shared is not None:
            synced = await self.shared.sync(probe_outages=True)
            if synced is not None:
                return list(synced.probes)
        return self.outages.targets()

    async def answered(self, target: str) -> bool:
        """Notes that a probe reached ``target``; True when this router releases its holds."""
        return await self._up(target)

    def circuit(self, provider: str, kind: str = "") -> CircuitState:
        """A circuit's state as routing sees it now (shared, or this router's own)."""
        shared = self.shared
        if shared is not None and shared.active:
            return shared.states.get((provider, kind), CircuitState.CLOSED)
        return self.circuits.state(provider, kind)

    def is_down(self, target: str) -> bool:
        """Whether ``target`` is believed unreachable (shared, or by this router)."""
        return self._clock().is_down(target)

    def _clock(self) -> OutageClock:
        shared = self.shared
        return shared.outages if shared is not None and shared.active else self.outages

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

        return Timing(throttle_due=throttle_due, hold_seconds=self._clock().hold_seconds)


def _why(down: set[str], closed: Iterable[str]) -> dict[str, str]:
    avoid = dict.fromkeys(closed, "circuit open")
    avoid.update(dict.fromkeys(down, "unreachable"))
    return avoid
