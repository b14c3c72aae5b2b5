"""Routing decisions: which provider sends each intent, and how leased intents become
SendBatch batches. Pure logic, no I/O. (What each send's outcome does to its intent is
:mod:`sluice.router.outcomes`.)

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
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

from sluice.common.model import PRIORITY
from sluice.common.providers import INTENT_KINDS, ProviderConfig, takes_smtputf8
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

__all__ = [
    "EXPIRED_ERROR",
    "MAX_MESSAGES_PER_SEND_BATCH",
    "PlannedBatch",
    "ProviderChooser",
    "RoutePlan",
    "demand_of",
    "plan_routes",
]

# The router's cap per SendBatch call. The sender splits a call into provider-sized batches
# itself; this only bounds one gRPC message and one sender's share of a lease.
MAX_MESSAGES_PER_SEND_BATCH = 500


EXPIRED_ERROR = "deadline passed before it could be sent"


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
        avoid: Mapping[str, Mapping[str, str]] | None = None,
        share: float = 1.0,
    ) -> list[ProviderState]:
        """The providers as the policy sees them now. ``circuit_open`` maps each provider
        whose circuit is open to when it is expected back (None: unknown); ``avoid`` maps
        an intent kind to the providers closed to it now, with why; ``share`` is the part of
        every provider's capacity this router plans with."""
        opened = circuit_open or {}
        used = quota_used or {}
        closed: dict[str, dict[str, str]] = {}
        for kind, providers in (avoid or {}).items():
            for name, why in providers.items():
                closed.setdefault(name, {})[kind] = why
        return [
            provider_state(
                p,
                quota_used=used.get(p.name, 0),
                circuit_open=p.name in opened,
                degraded=p.name in degraded,
                available_at=opened.get(p.name),
                closed=closed.get(p.name),
                share=share,
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
    """One SendBatch call to make: one provider, one template, one kind, up to 500 intents
    (a batch's outcome is a sample of that kind's circuit), and why
    each intent goes there (``reasons``, in the order of ``intents``; what is recorded on the
    intent as its route reason)."""

    provider: str
    template_id: str
    intents: tuple[LeasedIntent, ...]
    reasons: tuple[str, ...] = ()


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


def _route_smtputf8_apart(
    chooser: ProviderChooser,
    live: Sequence[LeasedIntent],
    at: float,
    states: Sequence[ProviderState],
) -> list[Decision]:
    """Decisions in ``live``'s order; an intent whose recipient needs SMTPUTF8 is decided
    among the providers that take it only (none: the policy fails it as unservable)."""
    if not any(i.smtputf8 for i in live):
        return chooser.route(live, now=at, states=states)
    able = {p.name for p in chooser.providers if takes_smtputf8(p)}
    by_id: dict[object, Decision] = {}
    for wanted in (False, True):
        group = [i for i in live if i.smtputf8 is wanted]
        group_states = [s for s in states if s.name in able] if wanted else list(states)
        if group:
            routed = chooser.route(group, now=at, states=group_states)
            by_id.update((i.id, d) for i, d in zip(group, routed, strict=True))
    return [by_id[i.id] for i in live]


def plan_routes(
    intents: Iterable[LeasedIntent],
    chooser: ProviderChooser,
    *,
    now: datetime,
    degraded: frozenset[str] = frozenset(),
    circuit_open: Mapping[str, float | None] | None = None,
    quota_used: Mapping[str, int] | None = None,
    avoid: Mapping[str, Mapping[str, str]] | None = None,
    share: float = 1.0,
    max_messages: int = MAX_MESSAGES_PER_SEND_BATCH,
) -> RoutePlan:
    """Routes one lease.

    Intents past their deadline become ``expired``; the policy decides the rest: routed ones
    are grouped per (provider, template, kind) in priority order and chunked at ``max_messages``,
    ones that must wait go back to pending with the policy's reason and retry time (no
    attempt spent), and ones no configured provider could ever serve become ``failed``.
    Each input intent appears exactly once in the result.

    ``degraded`` applies to every kind; ``avoid`` (kind -> provider -> why) closes a
    provider to one kind only, so a circuit open for marketing leaves it a candidate for
    transactional mail. ``share``: see :class:`sluice.router.policy.ProviderState`.
    """
    if max_messages < 1:
        raise ValueError("max_messages must be at least 1")
    decided: list[Completion] = []
    # one batch per kind too: a batch's outcome is a sample of its kind's circuit
    groups: dict[tuple[str, str, str], list[tuple[LeasedIntent, str]]] = {}
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
    states = chooser.states(
        degraded=degraded,
        circuit_open=circuit_open,
        quota_used=quota_used,
        avoid=avoid,
        share=share,
    )
    decisions = _route_smtputf8_apart(chooser, live, at, states)
    for intent, decision in zip(live, decisions, strict=True):
        if decision.verdict is Verdict.ROUTE:
            assert decision.provider is not None
            key = (decision.provider, intent.template_id, intent.kind)
            groups.setdefault(key, []).append((intent, decision.reason))
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
            provider=name,
            template_id=template,
            intents=tuple(intent for intent, _ in group[i : i + max_messages]),
            reasons=tuple(reason for _, reason in group[i : i + max_messages]),
        )
        for (name, template, _), group in groups.items()
        for i in range(0, len(group), max_messages)
    ]
    return RoutePlan(
        batches=tuple(batches),
        decided=tuple(decided),
        decisions={i.id: d for i, d in zip(live, decisions, strict=True)},
    )
