"""Delivery events in PostgreSQL: store a batch, move intents, suppress addresses.

:func:`record` takes every event of one or more webhook requests and, in ONE transaction
with a constant number of statements whatever the batch size:

1. takes the event-order lock (ids become visible in id order, see 0006),
2. claims each event's idempotency key; events already stored are dropped here, which is
   what makes provider redeliveries change state exactly once,
3. matches events to intents: by the intent id in the message's tags, else by the
   provider's message id,
4. moves each intent forward to the highest-ranked status among its new events, never back
   (``sent``/``unknown`` < ``delivered`` < ``bounced`` < ``complained``),
5. stores the events (with the raw payload) and whether each moved its intent,
6. suppresses addresses (hard bounce, complaint, unsubscribe; soft bounces once there are
   N within the window) and turns pending intents to those addresses to ``suppressed``,
7. notifies watchers (``NOTIFY sluice_delivery_events``, delivered at commit).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from sluice.common.db import db_boundary, rows_affected
from sluice.ingest.webhooks.events import RANK, DeliveryEvent

NOTIFY_CHANNEL = "sluice_delivery_events"
#: Serialises event inserts so ids commit in order: b"sluice\x00\x06" as a signed bigint.
EVENT_ORDER_LOCK = 0x736C_7569_6365_0006

#: Statuses an event may move an intent out of, as SQL over the row ``i``. Besides these, an
#: intent whose send outcome was unknown (the router holds it ``pending`` with
#: ``held_for = 'reconcile'``) is settled by the event. ``to_jsonb(i)`` reads held_for
#: without naming the column, so this statement also runs on a schema without it.
SETTLEABLE_SQL = """(i.status::text IN ('sent', 'unknown', 'delivered', 'bounced')
      OR (i.status = 'pending' AND to_jsonb(i) ->> 'held_for' = 'reconcile'))"""
#: The rank of an intent's current status, as SQL over the row ``i``.
CURRENT_RANK_SQL = """(CASE i.status::text WHEN 'delivered' THEN 1 WHEN 'bounced' THEN 2
                             WHEN 'complained' THEN 3 ELSE 0 END)"""
_STATUS_BY_RANK = {rank: status for status, rank in RANK.items()}

CLAIM_KEYS_SQL = """
INSERT INTO delivery_event_keys (source, event_id)
SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT DO NOTHING
RETURNING source, event_id
"""

_MATCH_COLUMNS = "id, provider, campaign_id, kind::text AS kind, provider_message_id, recipient"
MATCH_BY_ID_SQL = f"SELECT {_MATCH_COLUMNS} FROM intents WHERE id = ANY($1::uuid[])"
MATCH_BY_MESSAGE_SQL = f"""
SELECT {_MATCH_COLUMNS} FROM intents
WHERE provider_message_id = ANY($1::text[]) AND provider_message_id IS NOT NULL
"""

# One row per intent (the batch's highest rank, aggregated in Python: UPDATE ... FROM with
# two source rows for one target row picks one arbitrarily).
ADVANCE_SQL = f"""
UPDATE intents i
SET status = u.status::intent_status,
    last_error = CASE WHEN u.status IN ('bounced', 'complained') AND u.detail <> ''
                      THEN u.detail ELSE i.last_error END,
    lease_id = NULL,
    lease_expires_at = NULL,
    updated_at = now()
FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[]) AS u(id, status, rank, detail)
WHERE i.id = u.id AND {SETTLEABLE_SQL} AND {CURRENT_RANK_SQL} < u.rank
RETURNING i.id, i.status::text AS status
"""

INSERT_EVENTS_SQL = """
INSERT INTO delivery_events (
    source, event_id, provider, intent_id, campaign_id, kind, provider_message_id, recipient,
    event_type, bounce_type, applied, detail, occurred_at, raw
)
SELECT u.source, u.event_id, u.provider, u.intent_id, u.campaign_id, u.kind::intent_kind,
       u.provider_message_id, u.recipient, u.event_type, u.bounce_type, u.applied, u.detail,
       u.occurred_at, u.raw::jsonb
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::text[], $7::text[],
    $8::text[], $9::text[], $10::text[], $11::bool[], $12::text[], $13::timestamptz[],
    $14::text[]
) AS u(source, event_id, provider, intent_id, campaign_id, kind, provider_message_id,
       recipient, event_type, bounce_type, applied, detail, occurred_at, raw)
RETURNING id
"""

SOFT_BOUNCES_OVER_LIMIT_SQL = """
SELECT recipient FROM delivery_events
WHERE bounce_type = 'soft' AND recipient = ANY($1::text[])
  AND occurred_at > now() - make_interval(secs => $2)
GROUP BY recipient
HAVING count(*) >= $3
"""

# A stronger reason replaces a soft-bounce suppression; anything else already there stays
# (a manual suppression keeps its note).
SUPPRESS_SQL = """
INSERT INTO suppressions (address, reason, provider, intent_id, note)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::text[])
ON CONFLICT (address) DO UPDATE
SET reason = EXCLUDED.reason, provider = EXCLUDED.provider, intent_id = EXCLUDED.intent_id,
    note = EXCLUDED.note, created_at = now()
WHERE suppressions.reason = 'soft_bounce' AND EXCLUDED.reason <> 'soft_bounce'
RETURNING address
"""

# "intents.recipient = ANY(...)" so the plan starts from intents_pending_recipient_idx:
# written as "s.address = ANY(...)" the planner walked every pending intent instead
# (measured 38 ms per batch on 40k intents, against well under 1 ms).
SUPPRESS_PENDING_SQL = """
UPDATE intents
SET status = 'suppressed', last_error = 'recipient suppressed: ' || s.reason, updated_at = now()
FROM suppressions s
WHERE intents.recipient = ANY($1::text[]) AND intents.status = 'pending'
  AND s.address = intents.recipient
"""

# Per-provider outcome counts of this minute, aggregated per batch in Python (one row per
# provider), for the deliverability guards.
COUNT_OUTCOMES_SQL = """
INSERT INTO provider_event_counts AS c (
    provider, minute, delivered, hard_bounced, soft_bounced, complained
)
SELECT u.provider, date_trunc('minute', now()), u.d, u.h, u.s, u.c
FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[]) AS u(provider, d, h, s, c)
ON CONFLICT (provider, minute) DO UPDATE
SET delivered = c.delivered + EXCLUDED.delivered,
    hard_bounced = c.hard_bounced + EXCLUDED.hard_bounced,
    soft_bounced = c.soft_bounced + EXCLUDED.soft_bounced,
    complained = c.complained + EXCLUDED.complained
"""

_SUPPRESSING = {"complained": "complaint", "unsubscribed": "unsubscribe"}


@dataclass
class RecordResult:
    """What one :func:`record` call did."""

    stored: int = 0
    duplicates: int = 0
    applied: int = 0
    unmatched: int = 0
    suppressed: list[str] = field(default_factory=list)
    pending_suppressed: int = 0
    last_id: int = 0
    #: (source, event id) of the events this call stored (the rest were redeliveries).
    fresh: set[tuple[str, str]] = field(default_factory=set)


@dataclass(frozen=True)
class _Match:
    id: uuid.UUID
    provider: str | None
    campaign_id: str
    kind: str
    recipient: str


def _scrub(value: Any) -> Any:
    # PostgreSQL text and jsonb refuse NUL characters; a provider payload may carry one.
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


# The connection record() holds inside its transaction (a pool's proxy of one).
Conn = Any


@db_boundary
async def record(
    pool: asyncpg.Pool,
    events: Sequence[DeliveryEvent],
    *,
    soft_bounce_limit: int,
    soft_bounce_window: float,
    now: datetime | None = None,
) -> RecordResult:
    """Stores and applies ``events`` in one transaction (see the module docstring)."""
    result = RecordResult()
    unique: dict[tuple[str, str], DeliveryEvent] = {}
    for event in events:
        unique.setdefault((event.source, _scrub(event.event_id)), event)
    result.duplicates = len(events) - len(unique)
    if not unique:
        return result
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", EVENT_ORDER_LOCK)
        claimed = await conn.fetch(CLAIM_KEYS_SQL, [k[0] for k in unique], [k[1] for k in unique])
        result.fresh = {(r["source"], r["event_id"]) for r in claimed}
        fresh = [event for key, event in unique.items() if key in result.fresh]
        result.duplicates += len(unique) - len(fresh)
        if not fresh:
            return result
        matches = await _match(conn, fresh)
        applied_ids = await _advance(conn, fresh, matches)
        ids = await _insert(conn, fresh, matches, applied_ids)
        result.stored = len(ids)
        result.last_id = max(ids)
        result.applied = len(applied_ids)
        result.unmatched = sum(1 for m in matches if m is None)
        await _count_outcomes(conn, fresh, matches)
        result.suppressed, addresses = await _suppress(
            conn, fresh, matches, soft_bounce_limit, soft_bounce_window
        )
        if addresses:
            # Every address the batch says must not be mailed, newly suppressed or not: an
            # intent submitted after an earlier suppression is caught here too.
            status = await conn.execute(SUPPRESS_PENDING_SQL, addresses)
            result.pending_suppressed = rows_affected(status)
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(result.last_id))
    return result


def _match_of(r: asyncpg.Record) -> _Match:
    return _Match(r["id"], r["provider"], r["campaign_id"], r["kind"], r["recipient"])


async def _match(conn: Conn, events: Sequence[DeliveryEvent]) -> list[_Match | None]:
    tagged = list({e.intent_id for e in events if e.intent_id is not None})
    by_id: dict[uuid.UUID, _Match] = {}
    by_message: dict[str, _Match] = {}
    if tagged:
        for r in await conn.fetch(MATCH_BY_ID_SQL, tagged):
            by_id[r["id"]] = _match_of(r)
    untagged = list(
        {
            e.provider_message_id
            for e in events
            if e.provider_message_id and (e.intent_id is None or e.intent_id not in by_id)
        }
    )
    if untagged:
        for r in await conn.fetch(MATCH_BY_MESSAGE_SQL, untagged):
            by_message[r["provider_message_id"]] = _match_of(r)
    out: list[_Match | None] = []
    for e in events:
        found = by_id.get(e.intent_id) if e.intent_id is not None else None
        if found is None and e.provider_message_id:
            found = by_message.get(e.provider_message_id)
        out.append(found)
    return out


async def _advance(
    conn: Conn, events: Sequence[DeliveryEvent], matches: Sequence[_Match | None]
) -> dict[uuid.UUID, str]:
    best: dict[uuid.UUID, tuple[int, str]] = {}
    for event, match in zip(events, matches, strict=True):
        rank = RANK.get(event.type, 0)
        if match is None or rank == 0:
            continue
        if rank > best.get(match.id, (0, ""))[0]:
            best[match.id] = (rank, event.detail)
    if not best:
        return {}
    rows = await conn.fetch(
        ADVANCE_SQL,
        list(best),
        [_STATUS_BY_RANK[r] for r, _ in best.values()],
        [r for r, _ in best.values()],
        [_scrub(d) for _, d in best.values()],
    )
    return {r["id"]: r["status"] for r in rows}


async def _insert(
    conn: Conn,
    events: Sequence[DeliveryEvent],
    matches: Sequence[_Match | None],
    applied_ids: dict[uuid.UUID, str],
) -> list[int]:
    cols: list[list[Any]] = [[] for _ in range(14)]
    applied_once: set[uuid.UUID] = set()
    for e, m in zip(events, matches, strict=True):
        applied = m is not None and applied_ids.get(m.id) == e.type and m.id not in applied_once
        if applied and m is not None:
            applied_once.add(m.id)
        row = (
            e.source,
            _scrub(e.event_id),
            (m.provider if m is not None and m.provider else e.source),
            m.id if m is not None else None,
            m.campaign_id if m is not None else None,
            m.kind if m is not None else None,
            _scrub(e.provider_message_id),
            m.recipient if m is not None else _scrub(e.recipient),
            e.type,
            e.bounce,
            applied,
            _scrub(e.detail),
            e.occurred_at,
            json.dumps(_scrub(e.raw)) if e.raw is not None else None,
        )
        for col, value in zip(cols, row, strict=True):
            col.append(value)
    rows = await conn.fetch(INSERT_EVENTS_SQL, *cols)
    return [int(r["id"]) for r in rows]


async def _count_outcomes(
    conn: Conn, events: Sequence[DeliveryEvent], matches: Sequence[_Match | None]
) -> None:
    counts: dict[str, list[int]] = {}
    for e, m in zip(events, matches, strict=True):
        column = {"delivered": 0, "complained": 3}.get(e.type)
        if e.type == "bounced":
            column = 1 if e.bounce == "hard" else 2
        if column is None:
            continue
        provider = m.provider if m is not None and m.provider else e.source
        counts.setdefault(provider, [0, 0, 0, 0])[column] += 1
    if counts:
        values = list(counts.values())
        await conn.execute(
            COUNT_OUTCOMES_SQL, list(counts), *([v[i] for v in values] for i in range(4))
        )


async def _suppress(
    conn: Conn,
    events: Sequence[DeliveryEvent],
    matches: Sequence[_Match | None],
    soft_bounce_limit: int,
    soft_bounce_window: float,
) -> tuple[list[str], list[str]]:
    """Suppresses what the events call for; returns (newly suppressed, all named)."""
    wanted: dict[str, tuple[str, str, uuid.UUID | None, str]] = {}
    soft: dict[str, tuple[str, uuid.UUID | None, str]] = {}
    for e, m in zip(events, matches, strict=True):
        # The intent's stored recipient is the exact form pending intents carry.
        address = m.recipient if m is not None else _scrub(e.recipient)
        if not address:
            continue
        provider = m.provider if m is not None and m.provider else e.source
        intent = m.id if m is not None else None
        reason = _SUPPRESSING.get(e.type)
        if e.type == "bounced":
            if e.bounce == "hard":
                reason = "hard_bounce"
            else:
                soft.setdefault(address, (provider, intent, e.detail))
        if reason is not None and address not in wanted:
            wanted[address] = (reason, provider, intent, _scrub(e.detail))
    if soft:
        over = await conn.fetch(
            SOFT_BOUNCES_OVER_LIMIT_SQL, list(soft), soft_bounce_window, soft_bounce_limit
        )
        for r in over:
            address = r["recipient"]
            provider, intent, detail = soft[address]
            wanted.setdefault(address, ("soft_bounce", provider, intent, _scrub(detail)))
    if not wanted:
        return [], []
    values = list(wanted.values())
    rows = await conn.fetch(
        SUPPRESS_SQL,
        list(wanted),
        [v[0] for v in values],
        [v[1] for v in values],
        [v[2] for v in values],
        [v[3] for v in values],
    )
    return [r["address"] for r in rows], list(wanted)
