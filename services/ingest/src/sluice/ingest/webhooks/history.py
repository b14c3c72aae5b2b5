"""Reading stored events: an intent's history, and pages of the event stream."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

from sluice.common.db import Executor, db_boundary
from sluice.common.model import KIND_TO_PROTO, to_timestamp
from sluice.v1 import events_pb2

_COLUMNS = """id, event_id, provider, intent_id, campaign_id, kind::text AS kind,
              provider_message_id, event_type, bounce_type, detail, occurred_at, received_at"""

HISTORY_SQL = f"""
SELECT {_COLUMNS} FROM delivery_events
WHERE intent_id = $1 ORDER BY occurred_at, id LIMIT $2
"""

LAST_ID_SQL = "SELECT coalesce(max(id), 0) FROM delivery_events"

# Rows in (after, upto], filtered. The caller bounds upto - after, so a filter that matches
# nothing still reads a bounded slice and its cursor moves on.
PAGE_SQL = f"""
SELECT {_COLUMNS} FROM delivery_events
WHERE id > $1 AND id <= $2
  AND ($3::text IS NULL OR campaign_id = $3)
  AND ($4::text IS NULL OR kind::text = $4)
  AND ($5::text[] IS NULL OR event_type = ANY($5))
ORDER BY id
LIMIT $6
"""

TYPE_TO_PROTO: dict[str, events_pb2.DeliveryEventType.ValueType] = {
    "delivered": events_pb2.DELIVERY_EVENT_TYPE_DELIVERED,
    "bounced": events_pb2.DELIVERY_EVENT_TYPE_BOUNCED,
    "complained": events_pb2.DELIVERY_EVENT_TYPE_COMPLAINED,
    "opened": events_pb2.DELIVERY_EVENT_TYPE_OPENED,
    "clicked": events_pb2.DELIVERY_EVENT_TYPE_CLICKED,
    "deferred": events_pb2.DELIVERY_EVENT_TYPE_DEFERRED,
    "dropped": events_pb2.DELIVERY_EVENT_TYPE_DROPPED,
    "unsubscribed": events_pb2.DELIVERY_EVENT_TYPE_UNSUBSCRIBED,
}
PROTO_TO_TYPE = {v: k for k, v in TYPE_TO_PROTO.items()}
_BOUNCE = {"hard": events_pb2.BOUNCE_TYPE_HARD, "soft": events_pb2.BOUNCE_TYPE_SOFT}


def to_proto(row: asyncpg.Record) -> events_pb2.IntentEvent:
    """The wire form of one stored event."""
    msg = events_pb2.IntentEvent(
        cursor=str(row["id"]),
        intent_id=str(row["intent_id"] or ""),
        campaign_id=row["campaign_id"] or "",
        provider=row["provider"],
        type=TYPE_TO_PROTO[row["event_type"]],
        provider_message_id=row["provider_message_id"] or "",
        provider_event_id=row["event_id"],
        detail=row["detail"],
    )
    if row["kind"]:
        msg.intent = KIND_TO_PROTO[row["kind"]]
    if row["bounce_type"]:
        msg.bounce_type = _BOUNCE[row["bounce_type"]]
    for name, value in (("occur_time", row["occurred_at"]), ("receive_time", row["received_at"])):
        ts = to_timestamp(value)
        if ts is not None:
            getattr(msg, name).CopyFrom(ts)
    return msg


@db_boundary
async def intent_events(
    pool: Executor, intent_id: uuid.UUID, *, limit: int = 200
) -> list[events_pb2.IntentEvent]:
    """An intent's events, oldest first (at most ``limit``)."""
    return [to_proto(r) for r in await pool.fetch(HISTORY_SQL, intent_id, limit)]


@db_boundary
async def last_id(pool: Executor) -> int:
    """The newest event's cursor (0 when there is none)."""
    return int(await pool.fetchval(LAST_ID_SQL))


@db_boundary
async def page(
    pool: Executor,
    *,
    after: int,
    upto: int,
    campaign_id: str | None,
    kind: str | None,
    types: Sequence[str] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Filtered events with ``after < id <= upto``, oldest first."""
    return list(
        await pool.fetch(
            PAGE_SQL, after, upto, campaign_id, kind, list(types) if types else None, limit
        )
    )
