"""Ingest's durable state: idempotent intent inserts, intent reads, and templates.

Every function takes an :data:`sluice.common.db.Executor` (a pool, or a connection the caller
holds, e.g. inside a transaction). Batches cost a constant number of statements whatever
their size: on the 2-core reference machine one statement per row ran at ~7k rows/s and
``INSERT ... SELECT FROM unnest(...)`` at ~54k rows/s (the README's bench: ``bare insert``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from sluice.common.db import Executor, db_boundary
from sluice.common.templates import TemplateRow, get_templates, upsert_template

__all__ = [
    "INTENT_STATUSES",
    "MAX_LIST_LIMIT",
    "InsertOutcome",
    "IntentRow",
    "NewIntent",
    "TemplateRow",
    "get_intent",
    "get_templates",
    "insert_intents",
    "upsert_template",
]

INTENT_STATUSES = frozenset(
    {
        "pending",
        "leased",
        "sent",
        "delivered",
        "bounced",
        "complained",
        "failed",
        "cancelled",
        "suppressed",
        "expired",
    }
)
MAX_LIST_LIMIT = 10_000  # a guard against runaway pages; the API caps lower

# One statement for the whole batch. Arrays travel as one parameter each; variables go as
# JSON text and are cast here, which keeps the statement independent of the jsonb codec.
# reply_to, headers and tags are NULL when absent (most intents), which keeps rows narrow.
# due_at starts at send_at: that is when a router may first lease the intent.
#
# Idempotency is global although intents is partitioned by month (0005_catalogue.sql): the
# key is claimed in the unpartitioned intent_keys first, and only rows whose key this
# statement claimed are inserted. ON CONFLICT waits for a concurrent claim of the same key
# to commit, as it did on intents' own unique index before. Both tables take the same
# created_at (the transaction's now()).
INSERT_INTENTS_SQL = """
WITH u AS (
    SELECT * FROM unnest(
        $1::uuid[], $2::text[], $3::bytea[], $4::text[], $5::text[], $6::text[], $7::int2[],
        $8::text[], $9::text[], $10::timestamptz[], $11::timestamptz[], $12::text[],
        $13::text[], $14::bool[], $15::text[], $16::text[], $17::text[]
    ) AS u(id, idempotency_key, payload_hash, campaign_id, recipient, kind, priority,
           template_id, variables, send_at, deadline, traceparent, run, smtputf8,
           reply_to, headers, tags)
), claimed AS (
    INSERT INTO intent_keys (idempotency_key, intent_id, payload_hash, created_at)
    SELECT idempotency_key, id, payload_hash, now() FROM u
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING intent_id
)
INSERT INTO intents (
    id, idempotency_key, payload_hash, campaign_id, recipient, kind, priority,
    template_id, variables, send_at, deadline, due_at, traceparent, created_at, run, smtputf8,
    reply_to, headers, tags
)
SELECT u.id, u.idempotency_key, u.payload_hash, u.campaign_id, u.recipient,
       u.kind::intent_kind, u.priority, u.template_id, u.variables::jsonb,
       u.send_at, u.deadline, u.send_at, u.traceparent, now(), u.run, u.smtputf8,
       u.reply_to, u.headers::jsonb, u.tags::jsonb
FROM u JOIN claimed ON claimed.intent_id = u.id
RETURNING id
"""

# The keys the INSERT skipped belong to intents that exist (committed by someone else, or by
# an earlier call): read their id and hash so the caller always learns the intent's id.
EXISTING_BY_KEY_SQL = """
SELECT intent_id AS id, idempotency_key, payload_hash
FROM intent_keys WHERE idempotency_key = ANY($1::text[])
"""

_INTENT_COLUMNS = """
    id, idempotency_key, campaign_id, recipient, kind::text AS kind, priority, template_id,
    variables, send_at, deadline, due_at, status::text AS status, provider,
    provider_message_id, attempts, last_error, traceparent, created_at, updated_at, run,
    smtputf8, route_reason, route_cost, held_for, reply_to, headers, tags
"""

GET_INTENT_SQL = f"SELECT {_INTENT_COLUMNS} FROM intents WHERE id = $1"

# A conflicting key whose row vanished before we read it (only a retention purge could do
# that) sends the key around again; more rounds than this means something is badly wrong.
_MAX_INSERT_ROUNDS = 3


# Not frozen: a frozen dataclass's __init__ costs ~8x more (object.__setattr__ per field),
# measured at ~7 us of a per-intent budget of ~40 us in a 10,000-intent batch.
@dataclass(slots=True)
class NewIntent:
    """An intent ingest has validated and is about to store (treat it as read-only).

    ``priority``: 0 transactional, 1 digest, 2 marketing (lower leases first).
    ``payload_hash`` identifies the request's content, so that a retry with the same key is
    told apart from a reuse of the key for something else.
    """

    id: UUID
    idempotency_key: str
    payload_hash: bytes
    campaign_id: str
    recipient: str
    kind: str
    priority: int
    template_id: str
    variables: dict[str, str]
    send_at: datetime
    deadline: datetime
    traceparent: str | None
    run: str = ""
    smtputf8: bool = False
    # checked extras (sluice.ingest.extras); None when not given
    reply_to: str | None = None
    headers: dict[str, str] | None = None
    tags: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class InsertOutcome:
    """What happened to one :class:`NewIntent` of a batch.

    - ``created=True``: stored now; ``intent_id`` is the row's id.
    - ``created=False, conflict=False``: the key was already stored with the same payload
      (a retry); ``intent_id`` is the stored intent's id.
    - ``conflict=True``: the key is stored with a different payload; ``intent_id`` is the
      stored intent's id and nothing was written.

    ``intent_id`` is never None for a stored key; the type allows None only so callers can
    build outcomes for rows they rejected before reaching the database.
    """

    intent_id: UUID | None
    created: bool
    conflict: bool
    #: Created with status ``suppressed`` (the recipient is on the suppression list).
    suppressed: bool = False


@dataclass(frozen=True, slots=True)
class IntentRow:
    """An intent as stored (every column except payload_hash and the lease bookkeeping)."""

    id: UUID
    idempotency_key: str
    campaign_id: str
    recipient: str
    kind: str
    priority: int
    template_id: str
    variables: dict[str, str]
    send_at: datetime
    deadline: datetime
    due_at: datetime
    status: str
    provider: str | None
    provider_message_id: str | None
    attempts: int
    last_error: str | None
    traceparent: str | None
    created_at: datetime
    updated_at: datetime
    run: str = ""
    smtputf8: bool = False

    # the router's latest decision (migration 0003)
    route_reason: str | None = None
    route_cost: float | None = None
    held_for: str | None = None

    # submitted extras (migration 0007); None when not given
    reply_to: str | None = None
    headers: dict[str, str] | None = None
    tags: dict[str, str] | None = None


def _json_text(variables: Mapping[str, str]) -> str:
    return json.dumps(variables, separators=(",", ":"), ensure_ascii=False)


@db_boundary
async def insert_intents(pool: Executor, rows: Sequence[NewIntent]) -> list[InsertOutcome]:
    """Store a batch of intents idempotently; return one outcome per row, in input order.

    Costs two statements whatever the batch size (one INSERT of every first occurrence of a
    key, then one SELECT for the keys it skipped), plus a repeat only in the rare case
    described at ``_MAX_INSERT_ROUNDS``. Within a batch the first occurrence of a key wins;
    later ones get that row's id with ``created=False``, and ``conflict=True`` if their
    payload hash differs. Safe under concurrent callers: ``ON CONFLICT`` waits for a
    concurrent insert of the same key to commit, and both callers then report the same id.
    """
    if not rows:
        return []
    # First occurrence of each key, in input order: only these go to the INSERT, so which
    # row of a duplicated key wins never depends on the order PostgreSQL inserts in.
    first: dict[str, NewIntent] = {}
    for row in rows:
        first.setdefault(row.idempotency_key, row)

    # key -> (stored id, stored payload hash, created by this call)
    resolved: dict[str, tuple[UUID, bytes, bool]] = {}
    # Insert in key order. A conflicting insert waits for the transaction that holds the key;
    # two concurrent batches sharing keys in different orders would each hold a key the other
    # waits for (deadlock, measured with 4 overlapping batches). One global order rules it out.
    todo = sorted(first.values(), key=lambda r: r.idempotency_key)
    for _ in range(_MAX_INSERT_ROUNDS):
        inserted = await pool.fetch(
            INSERT_INTENTS_SQL,
            [r.id for r in todo],
            [r.idempotency_key for r in todo],
            [r.payload_hash for r in todo],
            [r.campaign_id for r in todo],
            [r.recipient for r in todo],
            [r.kind for r in todo],
            [r.priority for r in todo],
            [r.template_id for r in todo],
            [_json_text(r.variables) for r in todo],
            [r.send_at for r in todo],
            [r.deadline for r in todo],
            [r.traceparent for r in todo],
            [r.run for r in todo],
            [r.smtputf8 for r in todo],
            [r.reply_to for r in todo],
            [None if r.headers is None else _json_text(r.headers) for r in todo],
            [None if r.tags is None else _json_text(r.tags) for r in todo],
        )
        inserted_ids = {rec["id"] for rec in inserted}
        skipped: list[NewIntent] = []
        for r in todo:
            if r.id in inserted_ids:
                resolved[r.idempotency_key] = (r.id, r.payload_hash, True)
            else:
                skipped.append(r)
        if not skipped:
            break
        existing = await pool.fetch(EXISTING_BY_KEY_SQL, [r.idempotency_key for r in skipped])
        for rec in existing:
            resolved[rec["idempotency_key"]] = (rec["id"], bytes(rec["payload_hash"]), False)
        todo = [r for r in skipped if r.idempotency_key not in resolved]
        if not todo:
            break
    else:
        raise RuntimeError(
            f"{len(todo)} idempotency keys neither inserted nor found "
            f"after {_MAX_INSERT_ROUNDS} rounds"
        )

    outcomes: list[InsertOutcome] = []
    claimed: set[str] = set()
    for row in rows:
        stored_id, stored_hash, created_now = resolved[row.idempotency_key]
        # Only the first occurrence of a key can be the one that created the row.
        created = created_now and row.idempotency_key not in claimed
        claimed.add(row.idempotency_key)
        conflict = not created and stored_hash != row.payload_hash
        outcomes.append(InsertOutcome(intent_id=stored_id, created=created, conflict=conflict))
    return outcomes


def _intent_row(rec: asyncpg.Record) -> IntentRow:
    return IntentRow(
        id=rec["id"],
        idempotency_key=rec["idempotency_key"],
        campaign_id=rec["campaign_id"],
        recipient=rec["recipient"],
        kind=rec["kind"],
        priority=rec["priority"],
        template_id=rec["template_id"],
        variables=dict(rec["variables"]),
        send_at=rec["send_at"],
        deadline=rec["deadline"],
        due_at=rec["due_at"],
        status=rec["status"],
        provider=rec["provider"],
        provider_message_id=rec["provider_message_id"],
        attempts=rec["attempts"],
        last_error=rec["last_error"],
        traceparent=rec["traceparent"],
        created_at=rec["created_at"],
        updated_at=rec["updated_at"],
        run=rec["run"],
        smtputf8=rec["smtputf8"],
        route_reason=rec["route_reason"],
        route_cost=rec["route_cost"],
        held_for=rec["held_for"],
        reply_to=rec["reply_to"],
        headers=rec["headers"],
        tags=rec["tags"],
    )


@db_boundary
async def get_intent(pool: Executor, intent_id: UUID) -> IntentRow | None:
    """Return the intent with this id, or None."""
    rec = await pool.fetchrow(GET_INTENT_SQL, intent_id)
    return None if rec is None else _intent_row(rec)
