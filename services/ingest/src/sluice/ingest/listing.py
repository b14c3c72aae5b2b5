"""ListIntents with every filter: campaign, recipient, status and creation time.

The recipient filter never sends the address to PostgreSQL: it queries on a keyed digest
(:func:`recipient_hash`) that the expression index ``intents_recipient_created_idx``
(0005_catalogue.sql) holds, so slow-query logs and ``pg_stat_statements`` see only the
digest. Each filter shape is its own statement text (asyncpg prepares and caches each), so
PostgreSQL plans it with the matching index rather than one generic plan with
``$n IS NULL OR ...`` arms that can use none. Rows come newest first, keyset-paginated on
``(created_at, id)``, the trailing columns of all three list indexes.

The list indexes leave leased rows out (0010_lean_leases.sql: a lease then costs three index
entries fewer), so a listing reads two parts, each in index order: the rows that are not
leased from a list index, and the few leased ones (those of the current rounds) from the
router's leased-expiry index, merged by ``(created_at, id)``. A status filter reads only the
part that can hold that status.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any
from uuid import UUID

from sluice.common.db import Executor, db_boundary
from sluice.common.errors import InvalidArgument
from sluice.ingest.repository import (
    _INTENT_COLUMNS,
    INTENT_STATUSES,
    MAX_LIST_LIMIT,
    IntentRow,
    _intent_row,
)

#: Must match the prefix in sluice_recipient_hash() (0005_catalogue.sql).
RECIPIENT_HASH_PREFIX = b"sluice-recipient-v1:"


def recipient_hash(normalised_address: str) -> bytes:
    """The digest ``sluice_recipient_hash(recipient)`` computes in PostgreSQL."""
    return hashlib.sha256(RECIPIENT_HASH_PREFIX + normalised_address.encode()).digest()[:16]


def list_sql(
    *,
    recipient: bool,
    campaign: bool,
    status_is: str | None,
    after_time: bool,
    before_time: bool,
    cursor: bool,
) -> str:
    """The statement for one filter shape; parameters in the order of the flags, after $1
    (the limit). ``status_is`` is the status filter when there is one: it is a parameter
    too, and its value only decides which part of the table is read."""
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
    if status_is is not None:
        conditions.append(f"status = {param()}::text::intent_status")
    if after_time:
        conditions.append(f"created_at >= {param()}::timestamptz")
    if before_time:
        conditions.append(f"created_at < {param()}::timestamptz")
    if cursor:
        conditions.append(f"(created_at, id) < ({param()}::timestamptz, {param()}::uuid)")
    listed = f"SELECT {_INTENT_COLUMNS} FROM intents WHERE "
    order = " ORDER BY created_at DESC, id DESC LIMIT $1"
    # The explicit predicates let PostgreSQL use the partial list indexes (status <> leased)
    # and the leased-expiry index (status = leased) with a generic plan.
    settled = listed + " AND ".join([*conditions, "status <> 'leased'"]) + order
    leased = listed + " AND ".join([*conditions, "status = 'leased'"]) + order
    if status_is == "leased":
        return leased
    if status_is is not None:
        return settled
    return f"({settled}) UNION ALL ({leased}){order}"


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
    position ``after``. ``recipient`` must be normalised as ingest stores recipients.

    Pages are stable under concurrent inserts (new rows sort before the cursor, never into
    a later page). Raises InvalidArgument for an unknown status or a limit outside
    1..MAX_LIST_LIMIT."""
    violations: list[tuple[str, str]] = []
    if status is not None and status not in INTENT_STATUSES:
        violations.append(("status", f"unknown status {status!r}"))
    if not 1 <= limit <= MAX_LIST_LIMIT:
        violations.append(("limit", f"must be between 1 and {MAX_LIST_LIMIT}"))
    if violations:
        raise InvalidArgument("invalid intent listing", violations)
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
        status_is=status,
        after_time=created_after is not None,
        before_time=created_before is not None,
        cursor=after is not None,
    )
    return [_intent_row(rec) for rec in await pool.fetch(sql, *args)]
