"""sluice.router.repository against a real PostgreSQL: leases, results, reclaim, stats."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from sluice.common.db import create_pool
from sluice.ingest.repository import NewIntent, get_intent, insert_intents
from sluice.router import repository as repo
from sluice.router.repository import Completion
from tests.conftest import InsertTemplate
from tests.db.db_factories import new_intent


@pytest.fixture
async def template(insert_template: InsertTemplate) -> str:
    return await insert_template("welcome")


async def seed(pool: asyncpg.Pool, rows: list[NewIntent]) -> list[uuid.UUID]:
    outcomes = await insert_intents(pool, rows)
    assert all(o.created for o in outcomes)
    return [r.id for r in rows]


async def row(pool: asyncpg.Pool, intent_id: uuid.UUID) -> asyncpg.Record:
    rec = await pool.fetchrow(
        "SELECT status::text AS status, lease_id, lease_expires_at, attempts, due_at, provider,"
        " provider_message_id, last_error, now() AS now FROM intents WHERE id = $1",
        intent_id,
    )
    assert rec is not None
    return rec


async def expire_lease(pool: asyncpg.Pool, lease_id: uuid.UUID) -> None:
    await pool.execute(
        "UPDATE intents SET lease_expires_at = now() - interval '1 second' WHERE lease_id = $1",
        lease_id,
    )


async def test_lease_takes_due_intents_by_priority_then_due_time(
    pg_pool: asyncpg.Pool, template: str
) -> None:
    now = datetime.now(UTC)
    old_marketing = await seed(
        pg_pool,
        [new_intent(f"m{i}", send_at=now - timedelta(minutes=10 - i)) for i in range(3)],
    )
    digest = await seed(pg_pool, [new_intent("d", kind="digest")])
    transactional = await seed(
        pg_pool, [new_intent(f"t{i}", kind="transactional") for i in range(2)]
    )
    future = await seed(pg_pool, [new_intent("later", send_at=now + timedelta(hours=1))])

    first = await repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=2, lease_seconds=30)
    second = await repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=2, lease_seconds=30)
    third = await repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=10, lease_seconds=30)
    nothing = await repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=10, lease_seconds=30)

    assert {i.id for i in first} == set(transactional)
    assert {i.id for i in second} == {digest[0], old_marketing[0]}
    assert {i.id for i in third} == set(old_marketing[1:])
    assert nothing == []
    assert (await row(pg_pool, future[0]))["status"] == "pending"


async def test_lease_marks_rows_and_returns_what_a_sender_needs(
    pg_pool: asyncpg.Pool, template: str
) -> None:
    source = new_intent(
        "k1",
        kind="transactional",
        campaign_id="c1",
        variables={"name": "Zoë"},
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    await seed(pg_pool, [source])
    lease_id = uuid.uuid4()

    [leased] = await repo.lease(pg_pool, lease_id=lease_id, limit=10, lease_seconds=30)

    assert leased == repo.LeasedIntent(
        id=source.id,
        recipient=source.recipient,
        kind="transactional",
        template_id="welcome",
        variables={"name": "Zoë"},
        deadline=source.deadline,
        attempts=0,
        idempotency_key="k1",
        traceparent=source.traceparent,
        campaign_id="c1",
    )
    stored = await row(pg_pool, source.id)
    assert stored["status"] == "leased"
    assert stored["lease_id"] == lease_id
    remaining = (stored["lease_expires_at"] - stored["now"]).total_seconds()
    assert 29 < remaining <= 30


@pytest.mark.parametrize("campaign_share", [1.0, 0.5])  # LEASE_SQL, LEASE_FAIR_SQL
async def test_lease_returns_the_submitted_extras(
    pg_pool: asyncpg.Pool, template: str, campaign_share: float
) -> None:
    extras = {
        "reply_to": "help@example.com",
        "headers": {"X-Campaign": "spring"},
        "tags": {"cohort": "b"},
    }
    with_extras, plain = await seed(pg_pool, [new_intent("x1", **extras), new_intent("x2")])

    leased = await repo.lease(
        pg_pool, lease_id=uuid.uuid4(), limit=10, lease_seconds=30, campaign_share=campaign_share
    )

    by_id = {i.id: (i.reply_to, i.headers, i.tags) for i in leased}
    assert by_id == {
        with_extras: (extras["reply_to"], extras["headers"], extras["tags"]),
        plain: (None, None, None),
    }


async def test_complete_writes_each_kind_of_result(pg_pool: asyncpg.Pool, template: str) -> None:
    ids = await seed(pg_pool, [new_intent(f"k{i}") for i in range(4)])
    sent, throttled, transient, failed = ids
    lease_id = uuid.uuid4()
    assert len(await repo.lease(pg_pool, lease_id=lease_id, limit=10, lease_seconds=30)) == 4
    retry_at = datetime.now(UTC) + timedelta(minutes=5)

    written = await repo.complete(
        pg_pool,
        lease_id=lease_id,
        completions=[
            Completion(sent, "sent", "ses", "msg-1", attempted=True),
            Completion(throttled, "pending", "ses", None, retry_at, False, "throttled"),
            Completion(transient, "pending", "resend", None, retry_at, True, "503 from resend"),
            Completion(failed, "failed", "sendgrid", None, None, True, "550 no such user"),
        ],
    )

    assert written == 4
    s, th, tr, f = [await row(pg_pool, i) for i in ids]
    assert (s["status"], s["provider"], s["provider_message_id"], s["attempts"]) == (
        "sent",
        "ses",
        "msg-1",
        1,
    )
    assert (th["status"], th["due_at"], th["attempts"], th["last_error"]) == (
        "pending",
        retry_at,
        0,
        "throttled",
    )
    assert (tr["status"], tr["due_at"], tr["attempts"]) == ("pending", retry_at, 1)
    assert (f["status"], f["attempts"], f["last_error"]) == ("failed", 1, "550 no such user")
    for r in (s, th, tr, f):
        assert r["lease_id"] is None
        assert r["lease_expires_at"] is None
    # retried rows are not due until their retry time
    assert await repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=10, lease_seconds=30) == []
    await pg_pool.execute("UPDATE intents SET due_at = now() WHERE status = 'pending'")
    again = await repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=10, lease_seconds=30)
    assert {i.id for i in again} == {throttled, transient}
    assert {i.id: i.attempts for i in again} == {throttled: 0, transient: 1}


async def test_a_result_lands_once(pg_pool: asyncpg.Pool, template: str) -> None:
    [intent_id] = await seed(pg_pool, [new_intent("k")])
    lease_id = uuid.uuid4()
    await repo.lease(pg_pool, lease_id=lease_id, limit=1, lease_seconds=30)
    result = [Completion(intent_id, "pending", None, None, None, True, "timeout")]

    assert await repo.complete(pg_pool, lease_id=lease_id, completions=result) == 1
    assert await repo.complete(pg_pool, lease_id=lease_id, completions=result) == 0
    assert (await row(pg_pool, intent_id))["attempts"] == 1


async def test_stale_lease_result_is_ignored_once_someone_else_leased(
    pg_pool: asyncpg.Pool, template: str
) -> None:
    [intent_id] = await seed(pg_pool, [new_intent("k")])
    old, new = uuid.uuid4(), uuid.uuid4()
    await repo.lease(pg_pool, lease_id=old, limit=1, lease_seconds=30)
    await expire_lease(pg_pool, old)
    assert await repo.reclaim_expired(pg_pool) == 1
    assert len(await repo.lease(pg_pool, lease_id=new, limit=1, lease_seconds=30)) == 1

    late = [Completion(intent_id, "sent", "ses", "from-the-old-lease", attempted=True)]
    assert await repo.complete(pg_pool, lease_id=old, completions=late) == 0
    assert await repo.release(pg_pool, lease_id=old, ids=[intent_id]) == 0

    stored = await row(pg_pool, intent_id)
    assert (stored["status"], stored["lease_id"], stored["provider_message_id"]) == (
        "leased",
        new,
        None,
    )
    current = [Completion(intent_id, "sent", "resend", "from-the-new-lease", attempted=True)]
    assert await repo.complete(pg_pool, lease_id=new, completions=current) == 1
    assert (await row(pg_pool, intent_id))["provider_message_id"] == "from-the-new-lease"


async def test_result_of_a_reclaimed_lease_lands_until_it_is_leased_again(
    pg_pool: asyncpg.Pool, template: str
) -> None:
    [intent_id] = await seed(pg_pool, [new_intent("k")])
    lease_id = uuid.uuid4()
    await repo.lease(pg_pool, lease_id=lease_id, limit=1, lease_seconds=30)
    await expire_lease(pg_pool, lease_id)
    assert await repo.reclaim_expired(pg_pool) == 1
    assert (await row(pg_pool, intent_id))["status"] == "pending"

    accepted = [Completion(intent_id, "sent", "ses", "msg-1", attempted=True)]
    assert await repo.complete(pg_pool, lease_id=lease_id, completions=accepted) == 1

    stored = await row(pg_pool, intent_id)
    assert (stored["status"], stored["provider_message_id"]) == ("sent", "msg-1")
    # and it is not leased (so not sent) a second time
    assert await repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=1, lease_seconds=30) == []


async def test_reclaim_takes_only_expired_leases(pg_pool: asyncpg.Pool, template: str) -> None:
    ids = await seed(pg_pool, [new_intent(f"k{i}") for i in range(5)])
    live, lapsed = uuid.uuid4(), uuid.uuid4()
    await repo.lease(pg_pool, lease_id=live, limit=2, lease_seconds=30)
    await repo.lease(pg_pool, lease_id=lapsed, limit=3, lease_seconds=30)
    await expire_lease(pg_pool, lapsed)

    assert await repo.reclaim_expired(pg_pool, limit=2) == 2
    assert await repo.reclaim_expired(pg_pool, limit=2) == 1
    assert await repo.reclaim_expired(pg_pool) == 0

    rows = {i: await row(pg_pool, i) for i in ids}
    assert Counter(r["status"] for r in rows.values()) == {"leased": 2, "pending": 3}
    for r in rows.values():
        if r["status"] == "pending":
            assert r["lease_id"] == lapsed  # kept, so the lapsed lease's result can land
            assert r["lease_expires_at"] is None
            assert r["attempts"] == 0
        else:
            assert r["lease_id"] == live
    retaken = await repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=10, lease_seconds=30)
    assert len(retaken) == 3


async def test_release_gives_leases_back_unchanged(pg_pool: asyncpg.Pool, template: str) -> None:
    ids = await seed(pg_pool, [new_intent(f"k{i}") for i in range(3)])
    before = {i: await row(pg_pool, i) for i in ids}
    lease_id = uuid.uuid4()
    await repo.lease(pg_pool, lease_id=lease_id, limit=3, lease_seconds=30)

    assert await repo.release(pg_pool, lease_id=uuid.uuid4(), ids=ids) == 0  # not our lease
    assert await repo.release(pg_pool, lease_id=lease_id, ids=ids[:2]) == 2
    assert await repo.release(pg_pool, lease_id=lease_id, ids=[]) == 0

    for i in ids[:2]:
        after = await row(pg_pool, i)
        assert after["status"] == "pending"
        assert (after["due_at"], after["attempts"]) == (before[i]["due_at"], 0)
        assert (after["lease_id"], after["lease_expires_at"]) == (None, None)
    assert (await row(pg_pool, ids[2]))["status"] == "leased"
    retaken = await repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=10, lease_seconds=30)
    assert {i.id for i in retaken} == set(ids[:2])


async def test_complete_refuses_unknown_status_and_repeated_ids(
    pg_pool: asyncpg.Pool, template: str
) -> None:
    some = uuid.uuid4()
    with pytest.raises(ValueError, match="delivered"):
        await repo.complete(pg_pool, lease_id=some, completions=[Completion(some, "delivered")])
    with pytest.raises(ValueError, match="twice"):
        await repo.complete(
            pg_pool,
            lease_id=some,
            completions=[Completion(some, "sent"), Completion(some, "failed")],
        )
    assert await repo.complete(pg_pool, lease_id=some, completions=[]) == 0
    assert await repo.lease(pg_pool, lease_id=some, limit=0, lease_seconds=30) == []


async def test_two_routers_never_lease_the_same_intent(pg_dsn: str, template: str) -> None:
    """THE double-lease test: two routers, each with its own pool, race over 5,000 intents."""
    total = 5000
    pools = [await create_pool(pg_dsn, min_size=2, max_size=2) for _ in range(2)]
    try:
        await seed(pools[0], [new_intent(f"k{i}", kind="marketing") for i in range(total)])

        async def router(pool: asyncpg.Pool) -> list[uuid.UUID]:
            taken: list[uuid.UUID] = []
            while True:
                lease_id = uuid.uuid4()
                batch = await repo.lease(pool, lease_id=lease_id, limit=250, lease_seconds=30)
                if not batch:
                    return taken
                taken.extend(i.id for i in batch)
                results = [
                    Completion(i.id, "sent", "ses", f"m-{i.id}", attempted=True) for i in batch
                ]
                written = await repo.complete(pool, lease_id=lease_id, completions=results)
                assert written == len(batch)

        first, second = await asyncio.gather(router(pools[0]), router(pools[1]))

        assert len(first) == len(set(first))
        assert len(second) == len(set(second))
        assert set(first).isdisjoint(second)
        all_ids = {r["id"] for r in await pools[0].fetch("SELECT id FROM intents")}
        assert set(first) | set(second) == all_ids
        assert len(all_ids) == total
        # both really took part: otherwise the race was never run
        assert first
        assert second
        statuses = await pools[0].fetch(
            "SELECT status::text AS status, attempts, count(*) AS n FROM intents GROUP BY 1, 2"
        )
        assert [(r["status"], r["attempts"], r["n"]) for r in statuses] == [("sent", 1, total)]
    finally:
        for pool in pools:
            await pool.close()


async def test_queue_stats_counts_and_due_backlog(pg_pool: asyncpg.Pool, template: str) -> None:
    now = datetime.now(UTC)
    await seed(
        pg_pool,
        [
            new_intent(f"a{i}", campaign_id="a", send_at=now - timedelta(seconds=90))
            for i in range(3)
        ]
        + [new_intent("a-later", campaign_id="a", send_at=now + timedelta(hours=1))]
        + [new_intent(f"b{i}", campaign_id="b", kind="transactional") for i in range(2)],
    )
    lease_id = uuid.uuid4()
    [taken] = await repo.lease(pg_pool, lease_id=lease_id, limit=1, lease_seconds=30)
    await repo.complete(
        pg_pool, lease_id=lease_id, completions=[Completion(taken.id, "sent", "resend", "m1")]
    )

    everything = await repo.queue_stats(pg_pool)
    assert everything.counts == [
        ("pending", "transactional", None, 1),
        ("pending", "marketing", None, 4),
        ("sent", "transactional", "resend", 1),
    ]
    assert everything.due == 4
    assert 89 < everything.oldest_due_age_seconds < 120

    only_a = await repo.queue_stats(pg_pool, "a")
    assert only_a.counts == [("pending", "marketing", None, 4)]
    assert only_a.due == 3

    empty = await repo.queue_stats(pg_pool, "nobody")
    assert (empty.counts, empty.due, empty.oldest_due_age_seconds) == ([], 0, 0.0)

    # Leased rows are outside the campaign's list index (0010): counted all the same.
    await repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=2, lease_seconds=30)
    leased_a = await repo.queue_stats(pg_pool, "a")
    assert leased_a.counts == [
        ("pending", "marketing", None, 3),
        ("leased", "marketing", None, 1),
    ]


async def test_intent_row_stays_readable_through_the_lifecycle(
    pg_pool: asyncpg.Pool, template: str
) -> None:
    [intent_id] = await seed(pg_pool, [new_intent("k")])
    lease_id = uuid.uuid4()
    await repo.lease(pg_pool, lease_id=lease_id, limit=1, lease_seconds=30)
    await repo.complete(
        pg_pool,
        lease_id=lease_id,
        completions=[Completion(intent_id, "sent", "ses", "m1", attempted=True)],
    )
    got = await get_intent(pg_pool, intent_id)
    assert got is not None
    assert (got.status, got.provider, got.provider_message_id, got.attempts) == (
        "sent",
        "ses",
        "m1",
        1,
    )
    assert got.updated_at > got.created_at


async def test_a_write_back_finds_its_rows_by_key_not_by_scanning_the_queue(
    pg_pool: asyncpg.Pool, template: str
) -> None:
    # 20,000 queued rows and a lease of 500: PostgreSQL's default random_page_cost priced
    # the 500 primary-key probes above a sequential scan of the whole partition (measured
    # 7 ms at 40,000 rows, growing with the queue). Sluice's sessions set it for SSDs.
    await pg_pool.execute(
        "INSERT INTO intents (id, idempotency_key, payload_hash, campaign_id, recipient, kind,"
        " priority, template_id, send_at, deadline, due_at)"
        " SELECT gen_random_uuid(), 'k' || g, '\\x00'::bytea, 'c', 'u' || g || '@example.com',"
        " 'marketing', 2, $1, now(), now() + interval '1 day', now()"
        " FROM generate_series(1, 20000) g",
        template,
    )
    await pg_pool.execute("ANALYZE intents")
    lease_id = uuid.uuid4()
    leased = await repo.lease(pg_pool, lease_id=lease_id, limit=500, lease_seconds=30)
    ids = [i.id for i in leased]
    n = len(ids)
    async with pg_pool.acquire() as conn, conn.transaction():
        lines = await conn.fetch(
            "EXPLAIN " + repo.COMPLETE_SQL,
            lease_id,
            ids,
            ["sent"] * n,
            ["p"] * n,
            [f"m{i}" for i in range(n)],
            [None] * n,
            [True] * n,
            [None] * n,
            [None] * n,
            [None] * n,
            [None] * n,
        )
    plan = "\n".join(r[0] for r in lines)
    holding = await pg_pool.fetchval("SELECT sluice_intent_partition_name(now())")
    # (the empty partitions of coming months may be scanned: they have no pages)
    assert f"Seq Scan on {holding} " not in plan, plan
    assert f"Index Scan using {holding}_pkey" in plan, plan
