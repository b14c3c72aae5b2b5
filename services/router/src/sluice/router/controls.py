"""Operators' controls in PostgreSQL: provider pauses, re-queueing failed intents, and the
per-provider backlog. Shared by every router replica, since they all read the same rows.

Every function takes an :data:`sluice.common.db.Executor` (a pool or a held connection).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from sluice.common.db import Executor, db_boundary, rows_affected
from sluice.router import repository

__all__ = [
    "ProviderBacklog",
    "RetryFilter",
    "held",
    "pause",
    "paused",
    "provider_backlog",
    "resume",
    "retry_failed",
]

PAUSE_SQL = """
INSERT INTO provider_pauses (provider, kind, reason) VALUES ($1, $2, $3)
ON CONFLICT (provider, kind) DO UPDATE SET reason = EXCLUDED.reason
"""
RESUME_ALL_SQL = "DELETE FROM provider_pauses WHERE provider = $1"
RESUME_KIND_SQL = "DELETE FROM provider_pauses WHERE provider = $1 AND kind = $2"
PAUSED_SQL = "SELECT provider, kind FROM provider_pauses ORDER BY provider, kind"

# Failed intents matching the filter go back to pending, due now, with their attempts reset
# (the operator decided they deserve a fresh set) and a deadline at least $7 seconds away.
# One statement, in the same transaction as the request_id row, so a retried call can
# neither re-queue twice nor record an answer for work that did not happen.
RETRY_FAILED_SQL = """
UPDATE intents
SET status = 'pending', attempts = 0, due_at = now(), held_for = NULL,
    lease_id = NULL, lease_expires_at = NULL,
    deadline = greatest(deadline, now() + make_interval(secs => $7)),
    forced_provider = $6,
    last_error = 'requeued by RetryFailed after: ' || COALESCE(last_error, ''),
    updated_at = now()
WHERE id = ANY(ARRAY(
    SELECT id FROM intents
    WHERE status = 'failed'
      AND ($1::text = '' OR campaign_id = $1)
      AND ($2::text = '' OR last_error ILIKE '%' || $2 || '%')
      AND ($3::timestamptz IS NULL OR updated_at >= $3)
      AND ($4::timestamptz IS NULL OR updated_at < $4)
    ORDER BY updated_at
    LIMIT $5
    FOR UPDATE SKIP LOCKED
))
  AND status = 'failed'
"""
CLAIM_REQUEST_SQL = """
INSERT INTO retry_requests (request_id, requeued) VALUES ($1, 0)
ON CONFLICT (request_id) DO NOTHING
RETURNING request_id
"""
STORED_REQUEST_SQL = "SELECT requeued FROM retry_requests WHERE request_id = $1"
RECORD_REQUEST_SQL = "UPDATE retry_requests SET requeued = $2 WHERE request_id = $1"

BACKLOG_SQL = """
SELECT provider,
       count(*) FILTER (WHERE status IN ('pending', 'leased')) AS planned,
       count(*) FILTER (WHERE status IN ('sent', 'delivered', 'bounced', 'complained')) AS sent,
       COALESCE(sum(route_cost) FILTER (
           WHERE status IN ('sent', 'delivered', 'bounced', 'complained')), 0)::float8 AS cost
FROM intents WHERE provider IS NOT NULL
GROUP BY provider ORDER BY provider
"""
HELD_SQL = """
SELECT held_for, count(*) AS n FROM intents
WHERE held_for IS NOT NULL AND status = 'pending'
GROUP BY held_for ORDER BY held_for
"""


@dataclass(frozen=True, slots=True)
class RetryFilter:
    """Which failed intents RetryFailed re-queues, and how."""

    campaign_id: str = ""
    error_contains: str = ""
    failed_after: datetime | None = None
    failed_before: datetime | None = None
    provider: str | None = None
    limit: int = 10_000
    deadline_extension_seconds: float = 3600.0


@dataclass(frozen=True, slots=True)
class ProviderBacklog:
    """Work routed to one provider and not yet done, and what it has cost."""

    provider: str
    planned: int
    sent: int
    cost: float


@db_boundary
async def pause(pool: Executor, provider: str, kind: str = "", reason: str = "") -> None:
    """Pauses ``provider`` for ``kind`` ('' for every kind); pausing twice is a no-op."""
    await pool.execute(PAUSE_SQL, provider, kind, reason)


@db_boundary
async def resume(pool: Executor, provider: str, kind: str = "") -> int:
    """Removes the pause(s) of ``provider`` (all of them when ``kind`` is '') and makes
    the intents that waited for a provider due now; returns how many were released."""
    if kind:
        await pool.execute(RESUME_KIND_SQL, provider, kind)
        kinds = [kind]
    else:
        await pool.execute(RESUME_ALL_SQL, provider)
        kinds = ["transactional", "marketing", "digest"]
    released = 0
    for k in kinds:
        released += await repository.release_held(pool, f"kind:{k}")
    return released


@db_boundary
async def paused(pool: Executor) -> list[tuple[str, str]]:
    """Every pause as ``(provider, kind)`` (kind '' for all kinds)."""
    return [(r["provider"], r["kind"]) for r in await pool.fetch(PAUSED_SQL)]


@db_boundary
async def retry_failed(pool: asyncpg.Pool, request_id: str, where: RetryFilter) -> tuple[int, bool]:
    """Re-queues failed intents matching ``where``; returns (count, replayed).

    With the same ``request_id`` a second call re-queues nothing and answers the first
    call's count with ``replayed`` True.
    """
    async with pool.acquire() as conn, conn.transaction():
        claimed = await conn.fetchval(CLAIM_REQUEST_SQL, request_id)
        if claimed is None:
            stored = await conn.fetchval(STORED_REQUEST_SQL, request_id)
            return int(stored or 0), True
        count = rows_affected(
            await conn.execute(
                RETRY_FAILED_SQL,
                where.campaign_id,
                where.error_contains,
                where.failed_after,
                where.failed_before,
                where.limit,
                where.provider,
                float(where.deadline_extension_seconds),
            )
        )
        await conn.execute(RECORD_REQUEST_SQL, request_id, count)
    return count, False


@db_boundary
async def provider_backlog(pool: Executor) -> list[ProviderBacklog]:
    """Per provider: planned (pending or leased), sent, and the cost of what it sent.
    Reads every routed row: for operators, not a hot loop."""
    return [
        ProviderBacklog(r["provider"], int(r["planned"]), int(r["sent"]), float(r["cost"]))
        for r in await pool.fetch(BACKLOG_SQL)
    ]


@db_boundary
async def held(pool: Executor) -> dict[str, int]:
    """Pending intents held for something, by what (see ``intents.held_for``)."""
    return {r["held_for"]: int(r["n"]) for r in await pool.fetch(HELD_SQL)}
