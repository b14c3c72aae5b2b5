"""Deliverability guards: complaint and bounce rates per provider over a rolling window.

Mailbox providers start penalising a sender at about 0.1 % complaints, and a bounce rate
above about 2 % marks a list as poorly kept. When a provider's rate over the window is
above its threshold (and the window holds at least ``guard_min_volume`` outcomes, so three
complaints out of a hundred test sends do not trip it), its guard trips: marketing and
digest mail must stop going to it, transactional mail continues.

The state lives in ``provider_guards`` (one row per provider and guard) for the router to
read::

    SELECT provider, blocked_kinds FROM provider_guards WHERE tripped

and in the gauges ``sluice_provider_guard_tripped`` / ``sluice_provider_guard_rate`` for
alerting. Rates come from ``provider_event_counts`` (outcomes per provider and minute):
complaints / (delivered + bounced), hard bounces / (delivered + bounced).
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice.common.db import Executor, db_boundary
from sluice.ingest.webhooks.config import WebhookConfig

WINDOW_COUNTS_SQL = """
SELECT provider,
       sum(delivered)::int8 AS delivered,
       sum(hard_bounced)::int8 AS hard_bounced,
       sum(soft_bounced)::int8 AS soft_bounced,
       sum(complained)::int8 AS complained
FROM provider_event_counts
WHERE minute > now() - make_interval(secs => $1)
GROUP BY provider
"""

KNOWN_GUARDS_SQL = "SELECT DISTINCT provider FROM provider_guards"

UPSERT_GUARDS_SQL = """
INSERT INTO provider_guards AS g (
    provider, guard, tripped, rate, threshold, events, volume, window_seconds, tripped_at
)
SELECT u.provider, u.guard, u.tripped, u.rate, u.threshold, u.events, u.volume, $8,
       CASE WHEN u.tripped THEN now() END
FROM unnest($1::text[], $2::text[], $3::bool[], $4::float8[], $5::float8[], $6::int8[],
            $7::int8[]) AS u(provider, guard, tripped, rate, threshold, events, volume)
ON CONFLICT (provider, guard) DO UPDATE
SET tripped = EXCLUDED.tripped, rate = EXCLUDED.rate, threshold = EXCLUDED.threshold,
    events = EXCLUDED.events, volume = EXCLUDED.volume,
    window_seconds = EXCLUDED.window_seconds,
    tripped_at = CASE WHEN NOT EXCLUDED.tripped THEN NULL
                      WHEN g.tripped THEN g.tripped_at ELSE now() END,
    updated_at = now()
"""

PRUNE_COUNTS_SQL = """
DELETE FROM provider_event_counts WHERE minute < now() - make_interval(secs => $1)
"""


@dataclass(frozen=True)
class GuardState:
    """One guard of one provider after an evaluation."""

    provider: str
    guard: str  # complaint_rate | bounce_rate
    tripped: bool
    rate: float
    threshold: float
    events: int
    volume: int


def judge(
    provider: str, guard: str, events: int, volume: int, threshold: float, min_volume: int
) -> GuardState:
    """The guard's state for these counts (pure)."""
    rate = events / volume if volume else 0.0
    tripped = volume >= min_volume and rate > threshold
    return GuardState(provider, guard, tripped, rate, threshold, events, volume)


@db_boundary
async def evaluate(pool: Executor, config: WebhookConfig) -> list[GuardState]:
    """Recomputes every provider's guards and stores them; returns the new states."""
    rows = {r["provider"]: r for r in await pool.fetch(WINDOW_COUNTS_SQL, config.guard_window)}
    providers = set(rows) | {r["provider"] for r in await pool.fetch(KNOWN_GUARDS_SQL)}
    states: list[GuardState] = []
    for provider in sorted(providers):
        r = rows.get(provider)
        delivered = int(r["delivered"]) if r else 0
        hard = int(r["hard_bounced"]) if r else 0
        soft = int(r["soft_bounced"]) if r else 0
        complained = int(r["complained"]) if r else 0
        volume = delivered + hard + soft
        states.append(
            judge(
                provider,
                "complaint_rate",
                complained,
                volume,
                config.complaint_rate_threshold,
                config.guard_min_volume,
            )
        )
        states.append(
            judge(
                provider,
                "bounce_rate",
                hard,
                volume,
                config.bounce_rate_threshold,
                config.guard_min_volume,
            )
        )
    if states:
        await pool.execute(
            UPSERT_GUARDS_SQL,
            [s.provider for s in states],
            [s.guard for s in states],
            [s.tripped for s in states],
            [s.rate for s in states],
            [s.threshold for s in states],
            [s.events for s in states],
            [s.volume for s in states],
            config.guard_window,
        )
    await pool.execute(PRUNE_COUNTS_SQL, config.guard_window + 3600)
    return states


@db_boundary
async def blocked_kinds(pool: Executor) -> dict[str, set[str]]:
    """provider -> kinds it must not be sent right now (what the router reads)."""
    rows = await pool.fetch(
        "SELECT provider, blocked_kinds::text[] AS kinds FROM provider_guards WHERE tripped"
    )
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r["provider"], set()).update(r["kinds"])
    return out
