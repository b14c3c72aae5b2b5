"""The parts of a dispatch round around its SendBatch calls: routing a lease (operators'
pauses, intents that must wait for a provider), recording the decision, the write-back,
suppressing hard bounces, and counting what happened.

Routing itself is one :func:`sluice.router.routing.plan_routes` call. Before it, intents
whose kind has no usable provider right now (every candidate paused, unreachable or with
its circuit open) are set aside: they wait, pending with the reason, and fail only when no
configured provider, enabled or not, could ever serve their kind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sluice.common.db import Executor
from sluice.common.errors import Unavailable
from sluice.common.providers import INTENT_KINDS, ProviderConfig
from sluice.router import repository
from sluice.router.outcomes import is_hard_bounce
from sluice.router.provider_state import ProviderState
from sluice.router.repository import Completion, LeasedIntent
from sluice.router.routing import (
    EXPIRED_ERROR,
    MAX_MESSAGES_PER_SEND_BATCH,
    PlannedBatch,
    ProviderChooser,
    plan_routes,
)
from sluice.router.settings import RouterSettings
from sluice.router.stats import DispatchStats, RoundResult
from sluice.v1 import sender_pb2

__all__ = ["RoundBook", "RoundWork", "account", "write_back"]

log = logging.getLogger("sluice.router.round")

PAUSES_REFRESH_SECONDS = 1.0

# The repository maps connection errors to Unavailable (db_boundary): worth retrying.
_RETRYABLE: tuple[type[BaseException], ...] = (Unavailable,)

SUPPRESS_SQL = """
INSERT INTO suppressions (address, reason, provider, intent_id, note)
SELECT a, 'hard_bounce', p, i, 'permanent failure at send: ' || n
FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[]) AS u(a, p, i, n)
ON CONFLICT (address) DO NOTHING
"""
# Operators' pauses, and the deliverability guards ingest trips from delivery events (a
# complaint or bounce rate over its threshold): a tripped guard pauses the kinds it lists
# (marketing, digest; never transactional) for that provider, on every router.
PAUSES_SQL = """
SELECT provider, kind FROM provider_pauses
UNION
SELECT provider, unnest(blocked_kinds)::text FROM provider_guards WHERE tripped
"""


def no_usable_provider(kind: str, why: str) -> str:
    """The last_error of an intent waiting for a provider."""
    return f"waiting: no usable provider for {kind} ({why})"


@dataclass(frozen=True, slots=True)
class RoundWork:
    """A routed lease: the batches to send, and the intents decided without sending."""

    batches: tuple[PlannedBatch, ...]
    decided: tuple[Completion, ...]


class RoundBook:
    """Routing input that changes while the router runs (pauses, avoided providers), and
    what happens after a write-back. One per dispatcher."""

    def __init__(
        self,
        pool: Executor,
        providers: Sequence[ProviderConfig],
        state: ProviderState,
        rng: random.Random,
        settings: RouterSettings,
    ) -> None:
        self._pool = pool
        self._providers = tuple(providers)
        self._by_name = {p.name: p for p in providers}
        self._state = state
        self._rng = rng
        self._settings = settings
        self._pauses: frozenset[tuple[str, str]] = frozenset()
        self._pauses_read = -1e9
        self._chooser = ProviderChooser(providers)
        self._suppressions: bool | None = None
        # kinds some configured provider (enabled or not) serves: the others fail at once
        self.servable = frozenset(k for k in INTENT_KINDS for p in providers if k in p.intents)

    @property
    def pauses(self) -> frozenset[tuple[str, str]]:
        """``(provider, kind)`` pairs paused by an operator or by a tripped deliverability
        guard (kind '' pauses every kind)."""
        return self._pauses

    async def refresh_pauses(self, *, force: bool = False) -> None:
        """Re-reads the pauses and guards (at most once a second unless ``force``)."""
        if not force and time.monotonic() - self._pauses_read < PAUSES_REFRESH_SECONDS:
            return
        records = await self._pool.fetch(PAUSES_SQL)
        self._pauses_read = time.monotonic()
        pauses = frozenset((r["provider"], r["kind"]) for r in records)
        if pauses != self._pauses:
            self._pauses = pauses
            self._chooser = ProviderChooser(self._unpaused(pauses))

    def _unpaused(self, pauses: frozenset[tuple[str, str]]) -> list[ProviderConfig]:
        out = []
        for p in self._providers:
            if (p.name, "") in pauses:
                p = dataclasses.replace(p, enabled=False)
            else:
                kinds = frozenset(k for k in p.intents if (p.name, k) not in pauses)
                if kinds != p.intents:
                    p = dataclasses.replace(p, intents=kinds)
            out.append(p)
        return out

    async def plan(self, leased: Sequence[LeasedIntent], now: datetime) -> RoundWork:
        """Routes one lease: waiting and unservable intents here, the rest by plan_routes."""
        await self.refresh_pauses()
        view = await self._state.view(i.kind for i in leased)
        routable: list[LeasedIntent] = []
        decided: list[Completion] = []
        forced: dict[tuple[str, str, str], list[LeasedIntent]] = {}
        for intent in leased:
            kind = intent.kind
            if intent.forced_provider in self._by_name and intent.deadline > now:
                # An operator's RetryFailed chose the provider: no routing decision to make.
                key = (intent.forced_provider, intent.template_id, kind)
                forced.setdefault(key, []).append(intent)
                continue
            avoided = view.avoid.get(kind, {})
            usable = [p for p in self._chooser.candidates(kind) if p.name not in avoided]
            if usable:
                routable.append(intent)
            elif intent.deadline <= now:
                decided.append(
                    Completion(intent_id=intent.id, status="expired", last_error=EXPIRED_ERROR)
                )
            elif kind not in self.servable:
                decided.append(
                    Completion(
                        intent_id=intent.id,
                        status="failed",
                        last_error=f"no configured provider serves intent {kind}",
                    )
                )
            else:
                decided.append(self._wait(intent, now))
        # Avoidance is per kind: a circuit open for marketing leaves transactional alone.
        plan = plan_routes(
            routable,
            self._chooser,
            now=now,
            degraded=self._state.health.degraded(),
            avoid=view.avoid,
            share=view.share,
        )
        step = MAX_MESSAGES_PER_SEND_BATCH
        operator_batches = tuple(
            PlannedBatch(
                provider=name,
                template_id=template,
                intents=tuple(group[i : i + step]),
                reasons=(f"{name}: forced by RetryFailed",) * len(group[i : i + step]),
            )
            for (name, template, _), group in forced.items()
            for i in range(0, len(group), step)
        )
        return RoundWork(
            batches=operator_batches + plan.batches, decided=tuple(decided) + plan.decided
        )

    def _wait(self, intent: LeasedIntent, now: datetime) -> Completion:
        candidates = self._chooser.candidates(intent.kind)
        why = "circuit open or unreachable" if candidates else "paused or disabled"
        delay = self._settings.no_provider_wait_seconds * self._rng.uniform(0.5, 1.0)
        due = min(now + timedelta(seconds=delay), intent.deadline)
        return Completion(
            intent_id=intent.id,
            status="pending",
            due_at=due,
            last_error=no_usable_provider(intent.kind, why),
            held_for=f"kind:{intent.kind}",
        )

    def decorate(self, batch: PlannedBatch, completions: list[Completion]) -> list[Completion]:
        """Records the routing decision on each sent or tried intent: the provider, the
        policy's reason (or the operator's), and the cost."""
        config = self._by_name.get(batch.provider)
        if config is None:
            return completions
        cost = config.cost_per_thousand / 1000.0
        reasons = dict(zip((i.id for i in batch.intents), batch.reasons, strict=True))
        return [
            dataclasses.replace(c, route_reason=reasons.get(c.intent_id), route_cost=cost)
            if c.attempted
            else c
            for c in completions
        ]

    async def after_write(
        self, completions: Sequence[Completion], leased: Mapping[uuid.UUID, LeasedIntent]
    ) -> None:
        """Adds hard-bounced addresses to the suppression list, when there is one."""
        bounced = [
            c
            for c in completions
            if c.outcome == sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE
            and is_hard_bounce(c.last_error or "")
            and c.intent_id in leased
        ]
        if not bounced or not await self._has_suppressions():
            return
        try:
            await self._pool.execute(
                SUPPRESS_SQL,
                [leased[c.intent_id].recipient for c in bounced],
                [c.provider or "" for c in bounced],
                [c.intent_id for c in bounced],
                [(c.last_error or "")[:200] for c in bounced],
            )
        except Exception:
            # The intent is failed either way; a missed suppression only costs a later bounce.
            log.exception("could not suppress %d hard-bounced addresses", len(bounced))

    async def _has_suppressions(self) -> bool:
        if self._suppressions is None:
            found = await self._pool.fetchval("SELECT to_regclass('suppressions') IS NOT NULL")
            self._suppressions = bool(found)
        return self._suppressions


async def write_back(
    pool: Executor, lease_id: uuid.UUID, completions: Sequence[Completion], budget: float = 15.0
) -> int:
    """One write-back for the whole lease, retried on connection errors within ``budget``
    seconds (the caller keeps it shorter than what is left of the lease)."""
    deadline = time.monotonic() + budget
    delay = 0.1
    while True:
        try:
            return await repository.complete(pool, lease_id=lease_id, completions=completions)
        except _RETRYABLE as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("write-back failed, retrying in %.1f s: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class _TallyLike(Protocol):
    @property
    def seconds(self) -> float | None: ...
    @property
    def batches(self) -> int: ...
    @property
    def unreachable(self) -> int: ...


def account(
    stats: DispatchStats,
    leased: Iterable[LeasedIntent],
    completions: Sequence[Completion],
    written: int,
    tally: _TallyLike,
) -> RoundResult:
    """Adds a round to ``stats`` (by each completion's outcome) and returns its result."""
    leased_n = sum(1 for _ in leased)
    stats.rounds += 1
    stats.leased += leased_n
    sent = throttled = retrying = failed = expired = waiting = unknown = 0
    for c in completions:
        provider = c.provider or ""
        if c.outcome == sender_pb2.SEND_OUTCOME_UNKNOWN:
            unknown += 1
            stats.unknown[provider] += 1
        if c.status == "sent":
            sent += 1
            stats.sent[provider] += 1
        elif c.outcome == sender_pb2.SEND_OUTCOME_THROTTLED:
            throttled += 1
            stats.throttled[provider] += 1
        elif c.status == "pending" and c.outcome is None:
            waiting += 1
            stats.waiting += 1
        elif c.status == "pending":
            retrying += 1
            stats.retrying[provider] += 1
        elif c.status == "failed":
            failed += 1
            stats.failed_by_provider[provider] += 1
        else:
            expired += 1
    stats.failed += failed
    stats.expired += expired
    if written < len(completions):
        # Another router leased some of these after our lease ran out: its results win.
        stats.results_dropped += len(completions) - written
        log.warning(
            "%d of %d results not written: the lease was lost",
            len(completions) - written,
            len(completions),
        )
    return RoundResult(
        leased=leased_n,
        sent=sent,
        throttled=throttled,
        retrying=retrying,
        failed=failed,
        expired=expired,
        written=written,
        throttle_pause=tally.seconds,
        batches=tally.batches,
        unreachable=tally.unreachable,
        waiting=waiting,
        unknown=unknown,
    )
