"""Routing decisions: which provider sends each intent, and how leased intents become
SendBatch batches. Pure logic, no I/O. (What each send's outcome does to its intent is
:mod:`sluice.router.outcomes`.)

Provider choice (promise 6, foundation form): the cheapest enabled provider that serves the
intent's kind, ties broken by name. A provider the health tracker marks DEGRADED is skipped
when a healthy compatible one exists (simple failover), and used anyway when it is the only
choice: sending through a struggling provider beats not sending.

Every leased intent gets exactly one :class:`~sluice.router.repository.Completion`: an intent
no provider can send fails on its own, never taking the rest of its batch down with an
exception (one of the seed's defects).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sluice.common.model import PRIORITY
from sluice.common.providers import INTENT_KINDS, ProviderConfig
from sluice.router.repository import Completion, LeasedIntent

__all__ = [
    "EXPIRED_ERROR",
    "MAX_MESSAGES_PER_SEND_BATCH",
    "PlannedBatch",
    "ProviderChooser",
    "RoutePlan",
    "plan_routes",
]

# The router's cap per SendBatch call. The sender splits a call into provider-sized batches
# itself; this only bounds one gRPC message and one sender's share of a lease.
MAX_MESSAGES_PER_SEND_BATCH = 500

EXPIRED_ERROR = "deadline passed before it could be sent"


class ProviderChooser:
    """Candidate providers per intent kind, cheapest first, precomputed once per provider set."""

    def __init__(self, providers: Iterable[ProviderConfig]) -> None:
        self.providers: tuple[ProviderConfig, ...] = tuple(providers)
        ordered = sorted(
            (p for p in self.providers if p.enabled), key=lambda p: (p.cost_per_thousand, p.name)
        )
        self._candidates: dict[str, tuple[ProviderConfig, ...]] = {
            kind: tuple(p for p in ordered if kind in p.intents) for kind in INTENT_KINDS
        }

    def candidates(self, kind: str) -> tuple[ProviderConfig, ...]:
        """Enabled providers serving ``kind``, cheapest first (ties by name)."""
        return self._candidates.get(kind, ())

    def choose(self, kind: str, degraded: frozenset[str] = frozenset()) -> ProviderConfig | None:
        """The provider for an intent of ``kind``, or None when no enabled one serves it."""
        candidates = self._candidates.get(kind, ())
        if not candidates:
            return None
        if degraded:
            for provider in candidates:
                if provider.name not in degraded:
                    return provider
        return candidates[0]


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """One SendBatch call to make: one provider, one template, up to 500 intents."""

    provider: str
    template_id: str
    intents: tuple[LeasedIntent, ...]


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """A lease, routed: batches to send, and the intents already decided without sending."""

    batches: tuple[PlannedBatch, ...]
    decided: tuple[Completion, ...]


def no_provider_error(kind: str) -> str:
    """The last_error of an intent no enabled provider supports."""
    return f"no enabled provider supports intent {kind}"


def plan_routes(
    intents: Iterable[LeasedIntent],
    chooser: ProviderChooser,
    *,
    now: datetime,
    degraded: frozenset[str] = frozenset(),
    max_messages: int = MAX_MESSAGES_PER_SEND_BATCH,
) -> RoutePlan:
    """Routes one lease.

    Intents past their deadline become ``expired`` and intents no provider can take become
    ``failed``; the rest are grouped per (provider, template) in priority order and chunked
    at ``max_messages``. Each input intent appears exactly once in the result.
    """
    if max_messages < 1:
        raise ValueError("max_messages must be at least 1")
    decided: list[Completion] = []
    groups: dict[tuple[str, str], list[LeasedIntent]] = {}
    # Choice depends only on the kind: decide once per kind, not once per intent.
    choice: dict[str, ProviderConfig | None] = {}
    # The lease returns rows in no particular order; urgent kinds go into the first batches.
    for intent in sorted(intents, key=lambda i: PRIORITY.get(i.kind, len(PRIORITY))):
        if intent.deadline <= now:
            decided.append(
                Completion(intent_id=intent.id, status="expired", last_error=EXPIRED_ERROR)
            )
            continue
        if intent.kind in choice:
            provider = choice[intent.kind]
        else:
            provider = choice[intent.kind] = chooser.choose(intent.kind, degraded)
        if provider is None:
            decided.append(
                Completion(
                    intent_id=intent.id, status="failed", last_error=no_provider_error(intent.kind)
                )
            )
            continue
        groups.setdefault((provider.name, intent.template_id), []).append(intent)
    batches = [
        PlannedBatch(
            provider=name, template_id=template, intents=tuple(group[i : i + max_messages])
        )
        for (name, template), group in groups.items()
        for i in range(0, len(group), max_messages)
    ]
    return RoutePlan(batches=tuple(batches), decided=tuple(decided))
