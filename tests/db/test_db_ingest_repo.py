"""sluice.ingest.repository against a real PostgreSQL: idempotent inserts, reads, templates."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.common.errors import InvalidArgument
from sluice.ingest import listing
from sluice.ingest import repository as repo
from sluice.ingest.repository import InsertOutcome, TemplateRow
from tests.conftest import InsertTemplate
from tests.db.db_factories import new_intent


@pytest.fixture
async def template(insert_template: InsertTemplate) -> str:
    return await insert_template("welcome")


async def count_intents(pool: asyncpg.Pool, key_prefix: str = "") -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM intents WHERE starts_with(idempotency_key, $1)", key_prefix
        )
    )


class CountingExecutor:
    """Passes calls through to a pool and counts the statements sent."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.statements = 0

    def _counted(self, name: str) -> Callable[..., Any]:
        async def call(*args: Any) -> Any:
            self.statements += 1
            return await getattr(self._pool, name)(*args)

        return call

    def __getattr__(self, name: str) -> Any:
        return self._counted(name)


async def test_new_keys_are_created_in_input_order(pg_pool: asyncpg.Pool, template: str) -> None:
    rows = [new_intent(f"k{i}") for i in range(5)]

    outcomes = await repo.insert_intents(pg_pool, rows)

    assert outcomes == [InsertOutcome(r.id, created=True, conflict=False) for r in rows]
    assert await count_intents(pg_pool) == 5


async def test_same_key_same_payload_returns_the_stored_id(
    pg_pool: asyncpg.Pool, template: str
) -> None:
    first = new_intent("order-1")
    [created] = await repo.insert_intents(pg_pool, [first])

    retry = new_intent("order-1")  # a retry carries a new candidate id; the stored one wins
    [again] = await repo.insert_intents(pg_pool, [retry])

    assert created == InsertOutcome(first.id, created=True, conflict=False)
    assert again == InsertOutcome(first.id, created=False, conflict=False)
    assert await count_intents(pg_pool) == 1


async def test_same_key_other_payload_is_a_conflict_naming_the_stored_id(
    pg_pool: asyncpg.Pool, template: str
) -> None:
    first = new_intent("order-1", payload=b"A", recipient="alice@example.com")
    await repo.insert_intents(pg_pool, [first])

    [outcome] = await repo.insert_intents(
        pg_pool, [new_intent("order-1", payload=b"B", recipient="bob@example.com")]
    )

    assert outcome == InsertOutcome(first.id, created=False, conflict=True)
    stored = await repo.get_intent(pg_pool, first.id)
    assert stored is not None
    assert stored.recipient == "alice@example.com"  # nothing was overwritten
    assert await count_intents(pg_pool) == 1


async def test_duplicates_inside_one_batch_first_wins(pg_pool: asyncpg.Pool, template: str) -> None:
    a1 = new_intent("a", payload=b"1")
    b1 = new_intent("b", payload=b"1")
    a_same = new_intent("a", payload=b"1")
    a_other = new_intent("a", payload=b"2")

    outcomes = await repo.insert_intents(pg_pool, [a1, b1, a_same, a_other])

    assert outcomes == [
        InsertOutcome(a1.id, created=True, conflict=False),
        InsertOutcome(b1.id, created=True, conflict=False),
        InsertOutcome(a1.id, created=False, conflict=False),
        InsertOutcome(a1.id, created=False, conflict=True),
    ]
    assert await count_intents(pg_pool) == 2


async def test_statement_count_does_not_grow_with_the_batch(
    pg_pool: asyncpg.Pool, template: str
) -> None:
    await repo.insert_intents(pg_pool, [new_intent(f"old{i}") for i in range(300)])

    small = CountingExecutor(pg_pool)
    await repo.insert_intents(small, [new_intent("old0"), new_intent("new0")])  # type: ignore[arg-type]

    # 1,000 rows: new keys, keys stored earlier, a changed payload, in-batch duplicates
    batch = [new_intent(f"new{i}") for i in range(1, 600)]
    batch += [new_intent(f"old{i}") for i in range(300)]
    batch += [new_intent("old1", payload=b"changed")]
    batch += [new_intent(f"new{i}") for i in range(1, 101)]
    large = CountingExecutor(pg_pool)
    outcomes = await repo.insert_intents(large, batch)  # type: ignore[arg-type]

    assert len(outcomes) == 1000
    assert small.statements == large.statements == 2
    assert sum(o.created for o in outcomes) == 599
    assert sum(o.conflict for o in outcomes) == 1


async def test_concurrent_callers_agree_on_every_id(pg_pool: asyncpg.Pool, template: str) -> None:
    # Four callers at once (the pool's size) insert the same 200 keys in different orders,
    # several rounds: every key must end with one row and one id all callers agree on, and
    # nobody may deadlock (overlapping keys in different orders used to, about one round in
    # three).
    for round_no in range(6):
        keys = [f"r{round_no}-shared{i}" for i in range(200)]
        batches = [[new_intent(k) for k in keys[off:] + keys[:off]] for off in (0, 50, 100)]
        batches.append([new_intent(k) for k in reversed(keys)])

        results = await asyncio.gather(*(repo.insert_intents(pg_pool, b) for b in batches))

        ids: dict[str, set[uuid.UUID | None]] = {}
        created: Counter[str] = Counter()
        for batch, outcomes in zip(batches, results, strict=True):
            for row, outcome in zip(batch, outcomes, strict=True):
                assert not outcome.conflict
                ids.setdefault(row.idempotency_key, set()).add(outcome.intent_id)
                created[row.idempotency_key] += outcome.created
        assert all(len(v) == 1 for v in ids.values())
        assert set(created.values()) == {1}
        assert await count_intents(pg_pool, f"r{round_no}-") == len(keys)


# A batch is a list of (key number, payload number): few keys and two payloads, so batches
# repeat keys within themselves and across each other, with and without payload changes.
batches_strategy = st.lists(
    st.lists(st.tuples(st.integers(0, 7), st.integers(0, 1)), min_size=1, max_size=12),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batches=batches_strategy)
async def test_property_outcomes_match_a_first_wins_model(
    pg_pool: asyncpg.Pool, template: str, batches: list[list[tuple[int, int]]]
) -> None:
    prefix = f"p{uuid.uuid4().hex[:8]}-"  # every example gets keys of its own
    model: dict[str, tuple[uuid.UUID, bytes]] = {}  # key -> (first id, first payload)

    for spec in batches:
        rows = [new_intent(f"{prefix}{k}", payload=bytes([p])) for k, p in spec]
        outcomes = await repo.insert_intents(pg_pool, rows)
        assert len(outcomes) == len(rows)
        for row, outcome in zip(rows, outcomes, strict=True):
            known = model.get(row.idempotency_key)
            if known is None:
                model[row.idempotency_key] = (row.id, row.payload_hash)
                assert outcome == InsertOutcome(row.id, created=True, conflict=False)
            else:
                first_id, first_payload = known
                assert outcome == InsertOutcome(
                    first_id, created=False, conflict=row.payload_hash != first_payload
                )

    stored = await pg_pool.fetch(
        "SELECT idempotency_key, id, payload_hash FROM intents"
        " WHERE starts_with(idempotency_key, $1)",
        prefix,
    )
    assert {r["idempotency_key"]: (r["id"], r["payload_hash"]) for r in stored} == model


async def test_get_intent_returns_every_column(pg_pool: asyncpg.Pool, template: str) -> None:
    row = new_intent(
        "g1",
        kind="transactional",
        campaign_id="c9",
        variables={"name": "Zoë", "code": "<b>"},
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    await repo.insert_intents(pg_pool, [row])

    got = await repo.get_intent(pg_pool, row.id)

    assert got is not None
    assert (got.id, got.idempotency_key, got.campaign_id, got.recipient) == (
        row.id,
        "g1",
        "c9",
        row.recipient,
    )
    assert (got.kind, got.priority, got.template_id) == ("transactional", 0, "welcome")
    assert got.variables == {"name": "Zoë", "code": "<b>"}
    assert got.send_at == row.send_at
    assert got.deadline == row.deadline
    assert got.due_at == row.send_at  # first due when it is to be sent
    assert got.status == "pending"
    assert (got.provider, got.provider_message_id, got.attempts, got.last_error) == (
        None,
        None,
        0,
        None,
    )
    assert got.traceparent == row.traceparent
    assert got.created_at == got.updated_at
    assert await repo.get_intent(pg_pool, uuid.uuid4()) is None


async def test_extras_are_stored_and_null_when_absent(pg_pool: asyncpg.Pool, template: str) -> None:
    extras: dict[str, Any] = {
        "reply_to": "help@example.com",
        "headers": {"X-Campaign": "spring", "List-Id": "<news.example.com>"},
        "tags": {"cohort": "b"},
    }
    rows = [new_intent("e1", **extras), new_intent("e2"), new_intent("e3", tags={"t": "1"})]
    counting = CountingExecutor(pg_pool)
    await repo.insert_intents(counting, rows)  # type: ignore[arg-type]
    assert counting.statements == 1

    got = [await repo.get_intent(pg_pool, r.id) for r in rows]
    assert [(g.reply_to, g.headers, g.tags) for g in got if g is not None] == [
        (extras["reply_to"], extras["headers"], extras["tags"]),
        (None, None, None),
        (None, None, {"t": "1"}),
    ]
    # Absent extras are SQL NULLs (not empty JSON), which keeps the common row narrow.
    raw = await pg_pool.fetch(
        "SELECT idempotency_key, reply_to IS NULL AS r, headers IS NULL AS h, tags IS NULL AS t"
        " FROM intents ORDER BY idempotency_key"
    )
    assert [tuple(r) for r in raw] == [
        ("e1", False, False, False),
        ("e2", True, True, True),
        ("e3", True, True, False),
    ]


async def list_all(pool: asyncpg.Pool, page: int, **filters: Any) -> list[repo.IntentRow]:
    out: list[repo.IntentRow] = []
    after = None
    while True:
        rows = await listing.list_intents(pool, limit=page, after=after, **filters)
        assert len(rows) <= page
        out.extend(rows)
        if len(rows) < page:
            return out
        after = (rows[-1].created_at, rows[-1].id)


async def test_list_intents_pages_newest_first_without_gaps_or_repeats(
    pg_pool: asyncpg.Pool, template: str
) -> None:
    # Several batches: rows of one batch share created_at (one transaction), so the id
    # tie-break of the keyset is exercised as much as the timestamp.
    for b in range(4):
        await repo.insert_intents(
            pg_pool,
            [new_intent(f"b{b}-{i}", campaign_id=("even", "odd")[i % 2]) for i in range(15)],
        )
    await pg_pool.execute(
        "UPDATE intents SET status = 'sent' WHERE right(idempotency_key, 1) IN ('0', '5')"
    )
    # Leased rows are outside the list indexes (0010): listings read them from the
    # leased-expiry index and merge them in.
    await pg_pool.execute(
        "UPDATE intents SET status = 'leased', lease_id = gen_random_uuid(),"
        " lease_expires_at = now() + interval '1 minute'"
        " WHERE right(idempotency_key, 1) IN ('3', '7')"
    )
    everything = await pg_pool.fetch(
        "SELECT id, campaign_id, status::text AS status FROM intents"
        " ORDER BY created_at DESC, id DESC"
    )

    for page in (1, 7, 15, 60, 100):
        listed = await list_all(pg_pool, page, campaign_id=None, status=None)
        assert [r.id for r in listed] == [r["id"] for r in everything]

    odd = await list_all(pg_pool, 4, campaign_id="odd", status=None)
    assert [r.id for r in odd] == [r["id"] for r in everything if r["campaign_id"] == "odd"]

    sent = await list_all(pg_pool, 3, campaign_id=None, status="sent")
    assert [r.id for r in sent] == [r["id"] for r in everything if r["status"] == "sent"]
    assert len(sent) == 12

    leased = await list_all(pg_pool, 2, campaign_id=None, status="leased")
    assert [r.id for r in leased] == [r["id"] for r in everything if r["status"] == "leased"]
    assert len(leased) == 12  # keys 3, 7 and 13 of each of 4 batches

    odd_leased = await list_all(pg_pool, 3, campaign_id="odd", status="leased")
    assert [r.id for r in odd_leased] == [
        r["id"] for r in everything if r["campaign_id"] == "odd" and r["status"] == "leased"
    ]

    odd_pending = await list_all(pg_pool, 5, campaign_id="odd", status="pending")
    assert [r.id for r in odd_pending] == [
        r["id"] for r in everything if r["campaign_id"] == "odd" and r["status"] == "pending"
    ]
    assert (
        await listing.list_intents(pg_pool, campaign_id="none", status=None, limit=5, after=None)
        == []
    )


async def test_list_intents_rejects_bad_arguments(pg_pool: asyncpg.Pool) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await listing.list_intents(pg_pool, campaign_id=None, status="lost", limit=0, after=None)
    assert {field for field, _ in caught.value.field_violations} == {"status", "limit"}


def template_row(tid: str = "t1", **changes: Any) -> TemplateRow:
    fields: dict[str, Any] = {
        "id": tid,
        "version": 0,
        "subject": "Hello {{ name }}",
        "html_body": "<p>Hello {{ name }}</p>",
        "text_body": "Hello {{ name }}",
        "variables": ("name",),
        "from_address": "news@example.com",
    }
    fields.update(changes)
    return TemplateRow(**fields)


async def test_upsert_template_versions_only_real_changes(pg_pool: asyncpg.Pool) -> None:
    created = await repo.upsert_template(pg_pool, template_row())
    assert created == template_row(version=1)

    same = await repo.upsert_template(pg_pool, template_row(version=7))
    assert same.version == 1

    changed = await repo.upsert_template(pg_pool, template_row(variables=("name", "code")))
    assert changed == template_row(version=2, variables=("name", "code"))

    subject = await repo.upsert_template(
        pg_pool, template_row(variables=("name", "code"), subject="Hi")
    )
    assert subject.version == 3


async def test_get_templates_returns_the_known_ones(pg_pool: asyncpg.Pool) -> None:
    await repo.upsert_template(pg_pool, template_row("t1"))
    await repo.upsert_template(pg_pool, template_row("t2", text_body=""))

    got = await repo.get_templates(pg_pool, ["t2", "t1", "missing", "t1"])

    assert got == {
        "t1": template_row("t1", version=1),
        "t2": template_row("t2", version=1, text_body=""),
    }
    assert await repo.get_templates(pg_pool, []) == {}


async def test_unknown_template_is_refused_by_the_foreign_key(pg_pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await repo.insert_intents(pg_pool, [new_intent("x", template_id="nope")])
    assert await count_intents(pg_pool) == 0
