"""Routing decisions: which provider sends each intent, how leased intents become SendBatch
batches, and how each send result becomes the intent's next state. Pure logic, no I/O.

Provider choice (promise 6) is :mod:`sluice.router.policy`: the cheapest compatible, verified,
healthy provider that still meets the intent's deadline given the work already planned for
it, spilling to dearer ones only what would otherwise miss. :class:`ProviderChooser` holds
the plan between leases. A provider the health tracker marks DEGRADED is used only when no
healthy compatible one exists: sending through a struggling provider beats not sending.

Every leased intent gets exactly one :class:`~sluice.router.repository.Completion`: an intent
no provider can send fails on its own, never taking the rest of its batch down with an
exception (one of the seed's defects).
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sluice.common.model import PRIORITY
from sluice.common.providers import INTENT_KINDS, ProviderConfig
from sluice.router.policy import (
    Decision,
    Demand,
    PlanState,
    PolicyConfig,
    ProviderState,
    Verdict,
    decide,
    provider_state,
)
from sluice.router.repository import Completion, LeasedIntent
from sluice.v1 import sender_pb2

__all__ = [
    "MAX_MESSAGES_PER_SEND_BATCH",
    "PlannedBatch",
    "ProviderChooser",
    "RetryPolicy",
    "RoutePlan",
    "demand_of",
    "plan_routes",
    "resolve_batch",
    "resolve_batch_failure",
    "resolve_result",
]

# The router's cap per SendBatch call. The sender splits a call into provider-sized batches
# itself; this only bounds one gRPC message and one sender's share of a lease.
MAX_MESSAGES_PER_SEND_BATCH = 500

# Without a retry-after from the sender, a throttled intent still waits this long, so a
# sender bug cannot make the router spin on the same rows.
MIN_THROTTLE_DELAY_SECONDS = 0.1

EXPIRED_ERROR = "deadline passed before it could be sent"
_MAX_EXPONENT = 64  # 2**64 * any sane base is far above any retry_max: no float overflow


class _Settings(Protocol):
    @property
    def max_attempts(self) -> int: ...
    @property
    def retry_base_seconds(self) -> float: ...
    @property
    def retry_max_seconds(self) -> float: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a failed intent is tried again, and when it stops being tried.

    ``max_attempts`` counts attempts that reached a provider (throttling is not one).
    ``throttle_jitter`` spreads throttled retries over ``retry_after * (1 + U(0, jitter))``
    so a throttled lease does not come back as one thundering herd.
    """

    max_attempts: int = 5
    base_seconds: float = 2.0
    max_seconds: float = 600.0
    throttle_jitter: float = 0.1

    @classmethod
    def from_settings(cls, settings: _Settings) -> RetryPolicy:
        """The policy the settings describe."""
        return cls(
            max_attempts=settings.max_attempts,
            base_seconds=settings.retry_base_seconds,
            max_seconds=settings.retry_max_seconds,
        )

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter delay before retry number ``attempt`` (0 for the first retry):
        ``U(0, min(max_seconds, base_seconds * 2**attempt))``."""
        exponent = min(max(attempt, 0), _MAX_EXPONENT)
        ceiling = min(self.max_seconds, self.base_seconds * float(2**exponent))
        return rng.uniform(0.0, max(ceiling, 0.0))

    def throttle_delay(self, retry_after: float, rng: random.Random) -> float:
        """Delay for a throttled intent: the sender's retry-after plus 0-10 % jitter."""
        base = max(retry_after, MIN_THROTTLE_DELAY_SECONDS)
        return base * (1.0 + rng.uniform(0.0, self.throttle_jitter))


class ThrottlePacer:
    """Spreads throttled intents over time at their provider's sustained rate.

    Without it, every throttled intent of a lease comes back at the same retry-after: a
    backlog of N intents for a provider sending S per second is leased and written back
    about once a second each, N rows of churn per second for S sent. With it, this router
    keeps a "next free slot" per provider: each throttled intent is due one slot after the
    previous one, behind the sender's retry-after, so an intent comes back about when there
    is room for it. Slots come ``headroom`` times faster than the provider's sustained
    rate: at exactly its rate any intent that arrives a little early is throttled again and
    goes to the back of the schedule, leaving capacity unused; 1.5 keeps the limiter fed
    for about 1.5 leases per send. Slots are spread at most
    ``max_spread`` seconds ahead; past that, intents come back every ``max_spread`` s,
    which bounds both the churn of a huge backlog and the wait after the backlog clears.
    Each router paces its own throttles, so R routers re-lease up to R times the rate.
    """

    def __init__(
        self, rates: Mapping[str, float], max_spread: float, headroom: float = 1.5
    ) -> None:
        self._interval = {name: 1.0 / (rate * headroom) for name, rate in rates.items() if rate > 0}
        self._max_spread = max_spread
        self._next: dict[str, datetime] = {}

    def due_at(self, provider: str, earliest: datetime) -> datetime:
        """When a throttled intent for ``provider`` should be leased again (not before
        ``earliest``, the retry-after the sender gave)."""
        interval = self._interval.get(provider)
        if interval is None:
            return earliest
        slot = max(earliest, self._next.get(provider, earliest))
        limit = earliest + timedelta(seconds=self._max_spread)
        if slot > limit:
            # The spread is full: park this one at the limit without moving the clock.
            return limit
        self._next[provider] = slot + timedelta(seconds=interval)
        return slot


# The OutageBackoff key for the sender service itself (provider names are the others).
SENDER_TARGET = "<sender>"


class OutageBackoff:
    """Backoff for intents that could not be handed over at all (an unreachable provider,
    or an unreachable sender), which spend no attempt.

    With no attempt counted, a per-intent backoff would stay at its first step and a
    backlog would be re-leased every few seconds for as long as the outage lasts. This
    keeps a streak per target instead: every batch that found the target unreachable
    doubles the next delay (full jitter, capped at the policy's maximum), and one batch
    that gets through resets it.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._streak: dict[str, int] = {}

    def record(self, target: str, *, reachable: bool) -> None:
        """Notes whether a batch to ``target`` got through."""
        if reachable:
            self._streak.pop(target, None)
        else:
            self._streak[target] = self._streak.get(target, 0) + 1

    def delay(self, target: str, rng: random.Random) -> float:
        """Seconds to wait before handing an intent to ``target`` again."""
        return self._policy.backoff(max(self._streak.get(target, 1) - 1, 0), rng)


class ProviderChooser:
    """The routing policy (:mod:`sluice.router.policy`) over a fixed provider set, with the
    plan it keeps between leases.

    ``plan`` is the work already planned per provider; it is a small immutable value, so a
    caller that shares one plan between routers loads it before :func:`plan_routes` and
    stores it after.

    It also remembers, for the last ``remember`` intents it routed, which provider it
    planned them for: a throttled intent leased again claims the slot it was given instead
    of being counted twice. The lease does not return the row's provider yet; when it does
    (``LeasedIntent.provider``), that is used first and works across routers.
    """

    remember = 200_000

    def __init__(
        self, providers: Iterable[ProviderConfig], config: PolicyConfig | None = None
    ) -> None:
        self.providers: tuple[ProviderConfig, ...] = tuple(providers)
        self.config = config if config is not None else PolicyConfig()
        self.plan = PlanState()
        self._planned: dict[int, str] = {}
        ordered = sorted(
            (p for p in self.providers if p.enabled), key=lambda p: (p.cost_per_thousand, p.name)
        )
        self._candidates: dict[str, tuple[ProviderConfig, ...]] = {
            kind: tuple(p for p in ordered if kind in p.intents) for kind in INTENT_KINDS
        }

    def candidates(self, kind: str) -> tuple[ProviderConfig, ...]:
        """Enabled providers serving ``kind``, cheapest first (ties by name)."""
        return self._candidates.get(kind, ())

    def states(
        self,
        *,
        degraded: frozenset[str] = frozenset(),
        circuit_open: Mapping[str, float | None] | None = None,
        quota_used: Mapping[str, int] | None = None,
    ) -> list[ProviderState]:
        """The providers as the policy sees them now. ``circuit_open`` maps each provider
        whose circuit is open to when it is expected back (None: unknown)."""
        opened = circuit_open or {}
        used = quota_used or {}
        return [
            provider_state(
                p,
                quota_used=used.get(p.name, 0),
                circuit_open=p.name in opened,
                degraded=p.name in degraded,
                available_at=opened.get(p.name),
            )
            for p in self.providers
        ]

    def decide(
        self, demands: Sequence[Demand], *, now: float, states: Sequence[ProviderState]
    ) -> list[Decision]:
        """Decisions for a batch; the batch is added to :attr:`plan`."""
        decisions, self.plan = decide(demands, states, self.plan, now=now, config=self.config)
        return decisions

    def route(
        self, intents: Sequence[LeasedIntent], *, now: float, states: Sequence[ProviderState]
    ) -> list[Decision]:
        """Decisions for leased intents, remembering which provider each was planned for."""
        planned = self._planned
        keys = [i.id.int for i in intents]  # UUID hashes in Python; its int hashes in C
        stamps: dict[datetime, float] = {}  # a campaign shares one deadline: convert it once
        demands = [
            demand_of(i, now, planned.pop(k, None), stamps)
            for i, k in zip(intents, keys, strict=True)
        ]
        decisions = self.decide(demands, now=now, states=states)
        for key, decision in zip(keys, decisions, strict=True):
            if decision.provider is not None:
                planned[key] = decision.provider  # popped above: re-inserted last, oldest go first
        while len(planned) > self.remember:
            del planned[next(iter(planned))]
        return decisions

    def choose(self, kind: str, degraded: frozenset[str] = frozenset()) -> ProviderConfig | None:
        """The provider an intent of ``kind`` with no deadline pressure would get now, or
        None when none can take it. Leaves :attr:`plan` unchanged."""
        far = Demand(kind=kind, deadline=math.inf)
        (decision,), _ = decide([far], self.states(degraded=degraded), self.plan, now=0.0)
        return next((p for p in self.providers if p.name == decision.provider), None)


# Fields the lease may grow (the row's due time and provider); read only when it has them,
# since getattr with a default on a missing attribute costs an exception per intent.
_LEASE_FIELDS = frozenset(f.name for f in fields(LeasedIntent))
_HAS_DUE = "due_at" in _LEASE_FIELDS
_HAS_PROVIDER = "provider" in _LEASE_FIELDS


def demand_of(
    intent: LeasedIntent,
    now: float,
    planned: str | None = None,
    stamps: dict[datetime, float] | None = None,
) -> Demand:
    """What the policy needs to know of a leased intent (``planned``: the provider this
    router planned it for before, when the lease does not say; ``stamps``: a cache of
    deadline conversions for one lease)."""
    deadline = intent.deadline
    stamp = stamps.get(deadline) if stamps is not None else None
    if stamp is None:
        stamp = deadline.timestamp()
        if stamps is not None:
            stamps[deadline] = stamp
    due = getattr(intent, "due_at", None) if _HAS_DUE else None
    if _HAS_PROVIDER:
        planned = getattr(intent, "provider", None) or planned
    local = intent.recipient.rpartition("@")[0]
    return Demand(
        intent.kind,
        stamp,
        due.timestamp() if isinstance(due, datetime) else now,
        # A non-ASCII local part needs SMTPUTF8; a non-ASCII domain travels as IDNA.
        not local.isascii(),
        intent.campaign_id,
        planned,
    )


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """One SendBatch call to make: one provider, one template, up to 500 intents."""

    provider: str
    template_id: str
    intents: tuple[LeasedIntent, ...]


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """A lease, routed: batches to send, the intents already decided without sending, and
    the policy's decision (provider, reason, cost) for every intent it looked at."""

    batches: tuple[PlannedBatch, ...]
    decided: tuple[Completion, ...]
    decisions: Mapping[uuid.UUID, Decision] = field(default_factory=dict)


def no_provider_error(kind: str) -> str:
    """The last_error of an intent no configured provider supports."""
    return f"no configured provider supports intent {kind}"


def plan_routes(
    intents: Iterable[LeasedIntent],
    chooser: ProviderChooser,
    *,
    now: datetime,
    degraded: frozenset[str] = frozenset(),
    circuit_open: Mapping[str, float | None] | None = None,
    quota_used: Mapping[str, int] | None = None,
    max_messages: int = MAX_MESSAGES_PER_SEND_BATCH,
) -> RoutePlan:
    """Routes one lease.

    Intents past their deadline become ``expired``; the policy decides the rest: routed ones
    are grouped per (provider, template) in priority order and chunked at ``max_messages``,
    ones that must wait go back to pending with the policy's reason and retry time (no
    attempt spent), and ones no configured provider could ever serve become ``failed``.
    Each input intent appears exactly once in the result.
    """
    if max_messages < 1:
        raise ValueError("max_messages must be at least 1")
    decided: list[Completion] = []
    groups: dict[tuple[str, str], list[LeasedIntent]] = {}
    # The lease returns rows in no particular order; urgent kinds go into the first batches.
    live: list[LeasedIntent] = []
    for intent in sorted(intents, key=lambda i: PRIORITY.get(i.kind, len(PRIORITY))):
        if intent.deadline <= now:
            decided.append(
                Completion(intent_id=intent.id, status="expired", last_error=EXPIRED_ERROR)
            )
        else:
            live.append(intent)
    at = now.timestamp()
    states = chooser.states(degraded=degraded, circuit_open=circuit_open, quota_used=quota_used)
    decisions = chooser.route(live, now=at, states=states)
    for intent, decision in zip(live, decisions, strict=True):
        if decision.verdict is Verdict.ROUTE:
            assert decision.provider is not None
            groups.setdefault((decision.provider, intent.template_id), []).append(intent)
        elif decision.verdict is Verdict.WAIT:
            decided.append(
                Completion(
                    intent_id=intent.id,
                    status="pending",
                    provider=decision.provider,
                    due_at=datetime.fromtimestamp(decision.retry_at, UTC),
                    last_error=decision.reason,
                )
            )
        else:
            decided.append(
                Completion(intent_id=intent.id, status="failed", last_error=decision.reason)
            )
    batches = [
        PlannedBatch(
            provider=name, template_id=template, intents=tuple(group[i : i + max_messages])
        )
        for (name, template), group in groups.items()
        for i in range(0, len(group), max_messages)
    ]
    return RoutePlan(
        batches=tuple(batches),
        decided=tuple(decided),
        decisions={i.id: d for i, d in zip(live, decisions, strict=True)},
    )


def retry_after_seconds(result: sender_pb2.SendResult) -> float:
    if not result.HasField("retry_after"):
        return 0.0
    return result.retry_after.seconds + result.retry_after.nanos / 1e9


def _transient(
    intent: LeasedIntent,
    provider: str,
    reason: str,
    *,
    retry_after: float,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
) -> Completion:
    if intent.attempts + 1 >= policy.max_attempts:
        return Completion(
            intent_id=intent.id,
            status="failed",
            provider=provider,
            attempted=True,
            last_error=f"attempts exhausted ({intent.attempts + 1}): {reason}",
        )
    delay = max(policy.backoff(intent.attempts, rng), retry_after)
    return Completion(
        intent_id=intent.id,
        status="pending",
        provider=provider,
        due_at=now + timedelta(seconds=delay),
        attempted=True,
        last_error=reason,
    )


def resolve_result(
    intent: LeasedIntent,
    provider: str,
    result: sender_pb2.SendResult | None,
    *,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    pacer: ThrottlePacer | None = None,
    outage: OutageBackoff | None = None,
) -> Completion:
    """The next state of ``intent`` after the sender answered ``result`` for it.

    ``None`` (the sender gave no result for it) counts as a transient failure: the message
    may have reached the provider, so it is an attempt.
    """
    if result is None:
        return _transient(
            intent,
            provider,
            "sender returned no result for this message",
            retry_after=0.0,
            now=now,
            policy=policy,
            rng=rng,
        )
    outcome = result.outcome
    if outcome == sender_pb2.SEND_OUTCOME_ACCEPTED:
        return Completion(
            intent_id=intent.id,
            status="sent",
            provider=provider,
            provider_message_id=result.provider_message_id or None,
            attempted=True,
        )
    if outcome == sender_pb2.SEND_OUTCOME_THROTTLED:
        # Not an attempt: the rate limiter kept it from the provider.
        delay = policy.throttle_delay(retry_after_seconds(result), rng)
        due_at = now + timedelta(seconds=delay)
        if pacer is not None:
            due_at = pacer.due_at(provider, due_at)
        return Completion(
            intent_id=intent.id,
            status="pending",
            provider=provider,
            due_at=due_at,
            attempted=False,
        )
    if outcome == sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE:
        # Never handed to the provider: no attempt; the deadline bounds the waiting.
        wait = (
            outage.delay(provider, rng)
            if outage is not None
            else policy.backoff(intent.attempts, rng)
        )
        return Completion(
            intent_id=intent.id,
            status="pending",
            provider=provider,
            due_at=now + timedelta(seconds=wait),
            attempted=False,
            last_error=f"provider unavailable: {result.reason or 'unreachable'}",
        )
    if outcome == sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE:
        return Completion(
            intent_id=intent.id,
            status="failed",
            provider=provider,
            attempted=True,
            last_error=result.reason or "permanent failure",
        )
    reason = result.reason or (
        "transient failure"
        if outcome == sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE
        else f"sender returned outcome {outcome}"
    )
    return _transient(
        intent,
        provider,
        reason,
        retry_after=retry_after_seconds(result),
        now=now,
        policy=policy,
        rng=rng,
    )


def resolve_batch(
    batch: PlannedBatch,
    results: Sequence[sender_pb2.SendResult],
    *,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    pacer: ThrottlePacer | None = None,
    outage: OutageBackoff | None = None,
) -> list[Completion]:
    """One completion per intent of ``batch`` from the sender's results.

    Results are matched by intent id, so a sender that answers out of order, twice, or not
    at all for a message cannot attach an outcome to the wrong intent.
    """
    by_id: Mapping[str, sender_pb2.SendResult] = {r.intent_id: r for r in results}
    return [
        resolve_result(
            i,
            batch.provider,
            by_id.get(str(i.id)),
            now=now,
            policy=policy,
            rng=rng,
            pacer=pacer,
            outage=outage,
        )
        for i in batch.intents
    ]


def resolve_batch_failure(
    batch: PlannedBatch,
    reason: str,
    *,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    reached_provider: bool = True,
    outage: OutageBackoff | None = None,
) -> list[Completion]:
    """Completions for a SendBatch call that failed as a whole (timeout, sender down).

    When the call may have reached the provider (a timeout, an internal error) each
    message counts as a transient failed attempt, which keeps a persistently failing path
    from retrying forever. When it cannot have (``UNAVAILABLE``: the sender was unreachable
    or refused before sending), the intent is retried with backoff without spending an
    attempt, so a sender outage never turns into permanent failures; the deadline still
    bounds how long it waits.
    """
    if not reached_provider:
        return [
            Completion(
                intent_id=i.id,
                status="pending",
                provider=batch.provider,
                due_at=now
                + timedelta(
                    seconds=outage.delay(SENDER_TARGET, rng)
                    if outage is not None
                    else policy.backoff(i.attempts, rng)
                ),
                attempted=False,
                last_error=reason,
            )
            for i in batch.intents
        ]
    return [
        _transient(i, batch.provider, reason, retry_after=0.0, now=now, policy=policy, rng=rng)
        for i in batch.intents
    ]
