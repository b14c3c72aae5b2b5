"""The suppression list in PostgreSQL, and the submit-path hook that applies it.

Three places keep suppressed recipients from being sent to, so no ordering of concurrent
writes lets one through:

- :func:`suppress_created` marks new intents of suppressed recipients ``suppressed``
  right after they are inserted (the submit path calls it once per batch);
- :func:`add` marks the address's pending intents ``suppressed`` in the same transaction
  that adds it;
- the router's lease query skips every intent whose recipient is suppressed, which covers
  the window between an insert and its marking, and a suppression that commits while an
  insert is in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from uuid import UUID

import asyncpg

from sluice.common.db import Executor, db_boundary, rows_affected
from sluice.ingest import repository
from sluice.ingest.repository import InsertOutcome, NewIntent

REASONS = ("hard_bounce", "complaint", "manual", "unsubscribe", "soft_bounce")

_COLUMNS = "address, reason, provider, intent_id, note, created_at"

ADD_SQL = f"""
INSERT INTO suppressions (address, reason, provider, intent_id, note)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (address) DO NOTHING
RETURNING {_COLUMNS}
"""
GET_SQL = f"SELECT {_COLUMNS} FROM suppressions WHERE address = $1"
# The recipient hash index finds the address's intents; status then narrows to the queue.
SUPPRESS_PENDING_SQL = """
UPDATE intents SET status = 'suppressed', updated_at = now()
WHERE sluice_recipient_hash(recipient) = sluice_recipient_hash($1::text)
  AND recipient = $1 AND status = 'pending'
"""
REMOVE_SQL = "DELETE FROM suppressions WHERE address = $1"
CHECK_SQL = f"SELECT {_COLUMNS} FROM suppressions WHERE address = ANY($1::text[])"
_LIST = f"SELECT {_COLUMNS} FROM suppressions WHERE ($2::text IS NULL OR reason = $2) "
_ORDER = " ORDER BY created_at DESC, address DESC LIMIT $1"
LIST_SQL = _LIST + _ORDER
LIST_AFTER_SQL = _LIST + "AND (created_at, address) < ($3::timestamptz, $4::text)" + _ORDER

SUPPRESSED_AMONG_SQL = "SELECT address FROM suppressions WHERE address = ANY($1::text[])"
SUPPRESS_IDS_SQL = """
UPDATE intents SET status = 'suppressed', updated_at = now()
WHERE id = ANY($1::uuid[]) AND status = 'pending'
RETURNING id
"""


@dataclass(frozen=True, slots=True)
class Suppression:
    """One suppressed address."""

    address: str
    reason: str
    provider: str | None
    intent_id: UUID | None
    note: str
    created_at: datetime


def _row(rec: asyncpg.Record) -> Suppression:
    return Suppression(
        address=rec["address"],
        reason=rec["reason"],
        provider=rec["provider"],
        intent_id=rec["intent_id"],
        note=rec["note"],
        created_at=rec["created_at"],
    )


@db_boundary
async def add(
    pool: asyncpg.Pool,
    *,
    address: str,
    reason: str,
    provider: str | None,
    intent_id: UUID | None,
    note: str,
) -> tuple[Suppression, bool, int]:
    """Suppress ``address`` (normalised); returns the entry, whether it is new, and how many
    pending intents became ``suppressed``. An existing entry is kept as it is."""
    async with pool.acquire() as conn, conn.transaction():
        rec = await conn.fetchrow(ADD_SQL, address, reason, provider, intent_id, note)
        created = rec is not None
        if rec is None:
            rec = await conn.fetchrow(GET_SQL, address)
        assert rec is not None, "the address is suppressed: inserted now or before"
        marked = rows_affected(await conn.execute(SUPPRESS_PENDING_SQL, address))
    return _row(rec), created, marked


@db_boundary
async def remove(pool: Executor, address: str) -> bool:
    """Lift the suppression of ``address``; False when there was none."""
    return rows_affected(await pool.execute(REMOVE_SQL, address)) > 0


@db_boundary
async def check(pool: Executor, addresses: Sequence[str]) -> dict[str, Suppression]:
    """The suppressed ones among ``addresses`` (normalised), by address."""
    return {rec["address"]: _row(rec) for rec in await pool.fetch(CHECK_SQL, list(addresses))}


@db_boundary
async def list_suppressions(
    pool: Executor, *, limit: int, reason: str | None, after: tuple[datetime, str] | None
) -> list[Suppression]:
    """Suppressions newest first, optionally of one reason, after a keyset position."""
    if after is None:
        recs = await pool.fetch(LIST_SQL, limit, reason)
    else:
        recs = await pool.fetch(LIST_AFTER_SQL, limit, reason, *after)
    return [_row(r) for r in recs]


@db_boundary
async def suppress_created(
    pool: Executor, rows: Sequence[NewIntent], outcomes: Sequence[InsertOutcome]
) -> list[InsertOutcome]:
    """The submit-path hook: intents this batch created for suppressed recipients become
    ``suppressed``; returns the outcomes with ``suppressed`` set on those.

    One indexed look-up of the batch's recipients; a second statement only when some are
    suppressed, so the common case costs one cheap round trip.
    """
    created = {o.intent_id: r.recipient for r, o in zip(rows, outcomes, strict=True) if o.created}
    if not created:
        return list(outcomes)
    hits = {
        rec["address"]
        for rec in await pool.fetch(SUPPRESSED_AMONG_SQL, sorted(set(created.values())))
    }
    if not hits:
        return list(outcomes)
    ids = [i for i, recipient in created.items() if recipient in hits]
    marked = {rec["id"] for rec in await pool.fetch(SUPPRESS_IDS_SQL, ids)}
    return [
        replace(o, suppressed=True) if o.created and o.intent_id in marked else o for o in outcomes
    ]


@db_boundary
async def insert_intents(pool: Executor, rows: Sequence[NewIntent]) -> list[InsertOutcome]:
    """:func:`sluice.ingest.repository.insert_intents`, then :func:`suppress_created`: the
    one call the submit path makes to store a batch."""
    return await suppress_created(pool, rows, await repository.insert_intents(pool, rows))
