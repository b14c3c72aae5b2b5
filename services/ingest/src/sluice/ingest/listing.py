"""ListIntents with every filter: campaign, recipient, status and creation time.

The recipient filter never sends the address to PostgreSQL: it queries on a keyed digest
(:func:`recipient_hash`) that the expression index ``intents_recipient_created_idx``
(0005_catalogue.sql) holds, so slow-query logs and ``pg_stat_statements`` see only the
digest. Each filter shape is its own statement text (asyncpg prepares and caches each), so
PostgreSQL plans it with the matching index rather than one generic plan with
``$n IS NULL OR ...`` arms that can use none. Rows come newest first, keyset-paginated on
``(created_at, id)``, the trailing columns of all three list indexes.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any
from uuid import UUID

from sluice.common.db import Executor, db_boundary
from sluice.ingest.repository import _INTENT_COLUMNS, IntentRow, _intent_row

#: Must match the prefix in sluice_recipient_hash() (0005_catalogue.sql).
RECIPIENT_HASH_PREFIX = b"sluice-recipient-v1:"


def recipient_hash(normalised_address: str) -> bytes:
    """The digest ``sluice_recipient_hash(recipient)`` computes in PostgreSQL."""
    return hashlib.sha256(RECIPIENT_HASH_PREFIX + normalised_address.encode()).digest()[:16]


def list_sql(
    *,
    recipient: bool,
    campaign: bool,
    status: bool,
    after_time: bool,
    before_time: bool,
    cursor: bool,
) -> str:
    """The statement for one filter shape; parameters in the order of the flags, after $1
    (the limit)."""
    conditions: list[str] = []
    n = 1

    def param() -> str:
        nonlocal n
        n += 1
        return f"${n}"

    if recipient:
        conditions.append(f"sluice_recipient_hash(recipient) = {param()}::bytea")
    if campaign:
        conditions.append(f"campaign_id = {param()}")
    if status:
        conditions.append(f"status = {param()}::text::intent_status")
    if after_time:
        conditions.append(f"created_at >= {param()}::timestamptz")
    if before_time:
        conditions.append(f"created_at < {param()}::timestamptz")
    if cursor:
        conditions.append(f"(created_at, id) < ({param()}::timestamptz, {param()}::uuid)")
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    return (
        f"SELECT {_INTENT_COLUMNS} FROM intents{where} ORDER BY created_at DESC, id DESC LIMIT $1"
    )


@db_boundary
async def list_intents(
    pool: Executor,
    *,
    limit: int,
    recipient: str | None = None,
    campaign_id: str | None = None,
    status: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    after: tuple[datetime, UUID] | None = None,
) -> list[IntentRow]:
    """Up to ``limit`` intents matching every filter given, newest first, after the keyset
    position ``after``. ``recipient`` must be normalised as ingest stores recipients."""
    args: list[Any] = [limit]
    if recipient is not None:
        args.append(recipient_hash(recipient))
    if campaign_id is not None:
        args.append(campaign_id)
    if status is not None:
        args.append(status)
    if created_after is not None:
        args.append(created_after)
    if created_before is not None:
        args.append(created_before)
    if after is not None:
        args.extend(after)
    sql = list_sql(
        recipient=recipient is not None,
        campaign=campaign_id is not None,
        status=status is not None,
        after_time=created_after is not None,
        before_time=created_before is not None,
        cursor=after is not None,
    )
    return [_intent_row(rec) for rec in await pool.fetch(sql, *args)]
