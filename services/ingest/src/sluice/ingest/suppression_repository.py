"""The suppression list in PostgreSQL.

Three places keep suppressed recipients from being sent to, so no ordering of concurrent
writes lets one through:

- the submit path's INSERT stores a new intent of a suppressed recipient ``suppressed``
  (:data:`sluice.ingest.repository.INSERT_INTENTS_SQL`);
- :func:`add` marks the address's pending intents ``suppressed`` in the same transaction
  that adds it;
- the router's lease query skips every intent whose recipient is suppressed, which covers
  a suppression that commits while an insert is in flight (the INSERT did not see it, and
  :func:`add` did not see the row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from sluice.common.db import Executor, db_boundary, rows_affected

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
