"""CancelIntent, CancelCampaign and ListIntents' new filters, over real gRPC and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.ingest.listing import recipient_hash
from sluice.router import repository as router_repo
from sluice.router.repository import Completion
from sluice.v1 import ingest_pb2, intent_pb2
from tests.catalogue.catalogue_fixtures import Stubs, submission, welcome


async def submit(stubs: Stubs, *subs: intent_pb2.IntentSubmission) -> list[str]:
    done = await stubs.ingest.SubmitIntents(ingest_pb2.SubmitIntentsRequest(intents=list(subs)))
    assert all(r.intent_id for r in done.results), done
    return [r.intent_id for r in done.results]


def later(hours: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(datetime.now(UTC) + timedelta(hours=hours))
    return out


async def test_cancel_intent(stubs: Stubs, pg_pool: asyncpg.Pool) -> None:
    await stubs.templates.CreateTemplate(welcome())
    due, scheduled, busy = await submit(
        stubs, submission("c-1"), submission("c-2", send_at=later(5)), submission("c-3")
    )
    # c-1 and c-3 are due: lease both, then give c-1 back so only c-3 stays leased
    lease_id = uuid.uuid4()
    leased = await router_repo.lease(pg_pool, lease_id=lease_id, limit=10, lease_seconds=30)
    assert {str(i.id) for i in leased} == {due, busy}
    await router_repo.release(pg_pool, lease_id=lease_id, ids=[uuid.UUID(due)])

    for intent_id in (due, scheduled):
        done = await stubs.ingest.CancelIntent(ingest_pb2.CancelIntentRequest(id=intent_id))
        assert done.cancelled
        assert done.intent.status == intent_pb2.INTENT_STATUS_CANCELLED
    again = await stubs.ingest.CancelIntent(ingest_pb2.CancelIntentRequest(id=due))
    assert not again.cancelled
    assert again.intent.status == intent_pb2.INTENT_STATUS_CANCELLED

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.ingest.CancelIntent(ingest_pb2.CancelIntentRequest(id=busy))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "being sent" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.ingest.CancelIntent(ingest_pb2.CancelIntentRequest(id=str(uuid.uuid4())))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.ingest.CancelIntent(ingest_pb2.CancelIntentRequest(id="nope"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # nothing cancelled is ever leased
    assert await router_repo.lease(pg_pool, lease_id=uuid.uuid4(), limit=10, lease_seconds=30) == []


async def test_cancel_campaign_cancels_pending_and_lets_leased_finish(
    stubs: Stubs, pg_pool: asyncpg.Pool
) -> None:
    await stubs.templates.CreateTemplate(welcome())
    ids = await submit(stubs, submission("cc-1"))
    lease_id = uuid.uuid4()
    leased = await router_repo.lease(pg_pool, lease_id=lease_id, limit=10, lease_seconds=30)
    assert [str(i.id) for i in leased] == ids
    ids += await submit(
        stubs,
        submission("cc-2"),
        submission("cc-3", send_at=later(48)),
        submission("cc-4", recipient="bob@example.com"),
        submission("other-1", campaign_id="autumn"),
    )
    done = await stubs.ingest.CancelCampaign(ingest_pb2.CancelCampaignRequest(campaign_id="spring"))
    assert (done.cancelled, done.leased) == (3, 1)
    written = await router_repo.complete(
        pg_pool,
        lease_id=lease_id,
        completions=[Completion(intent_id=leased[0].id, status="sent", provider="ses")],
    )
    assert written == 1
    rows = await pg_pool.fetch(
        "SELECT idempotency_key AS k, status::text AS s FROM intents ORDER BY 1"
    )
    assert [(r["k"], r["s"]) for r in rows] == [
        ("cc-1", "sent"),
        ("cc-2", "cancelled"),
        ("cc-3", "cancelled"),
        ("cc-4", "cancelled"),
        ("other-1", "pending"),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.ingest.CancelCampaign(ingest_pb2.CancelCampaignRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_by_recipient_campaign_status_and_time(
    stubs: Stubs, pg_pool: asyncpg.Pool
) -> None:
    await stubs.templates.CreateTemplate(welcome())
    alice = await submit(stubs, *(submission(f"a-{i}") for i in range(5)))
    await submit(stubs, submission("b-1", recipient="bob@example.com"))
    await submit(stubs, submission("a-autumn", campaign_id="autumn"))
    await stubs.ingest.CancelIntent(ingest_pb2.CancelIntentRequest(id=alice[0]))

    async def keys(**filters: object) -> list[str]:
        out: list[str] = []
        token = ""
        while True:
            page = await stubs.ingest.ListIntents(
                ingest_pb2.ListIntentsRequest(page_size=2, page_token=token, **filters)  # type: ignore[arg-type]
            )
            out += [i.idempotency_key for i in page.intents]
            token = page.next_page_token
            if not token:
                return sorted(out)

    # the domain is case-insensitive, as ingest normalises it
    assert await keys(recipient="alice@EXAMPLE.com") == sorted(
        [f"a-{i}" for i in range(5)] + ["a-autumn"]
    )
    assert await keys(recipient="alice@example.com", campaign_id="autumn") == ["a-autumn"]
    assert await keys(recipient="bob@example.com") == ["b-1"]
    assert await keys(recipient="carol@example.com") == []
    assert await keys(recipient="alice@example.com", status=intent_pb2.INTENT_STATUS_CANCELLED) == [
        "a-0"
    ]

    # creation time: move one intent a day back and ask around it
    await pg_pool.execute(
        "UPDATE intents SET created_at = now() - interval '1 day' WHERE idempotency_key = 'b-1'"
    )
    cut = timestamp_pb2.Timestamp()
    cut.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    assert await keys(created_before=cut) == ["b-1"]
    assert "b-1" not in await keys(created_after=cut)
    assert len(await keys(created_after=cut)) == 6

    first = await stubs.ingest.ListIntents(
        ingest_pb2.ListIntentsRequest(recipient="alice@example.com", page_size=2)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.ingest.ListIntents(
            ingest_pb2.ListIntentsRequest(
                recipient="bob@example.com", page_size=2, page_token=first.next_page_token
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.ingest.ListIntents(ingest_pb2.ListIntentsRequest(recipient="not an address"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def explain(pool: asyncpg.Pool, sql: str, *args: object) -> str:
    """The plan of ``sql``, with sequential scans priced out: the tables are empty, and an
    empty table makes any plan look as good as an index scan."""
    async with pool.acquire() as conn:
        await conn.execute("SET enable_seqscan = off")
        return "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", *args))


async def test_the_recipient_query_uses_the_index_and_only_the_digest(
    pg_pool: asyncpg.Pool,
) -> None:
    from sluice.ingest.listing import list_sql

    sql = list_sql(
        recipient=True,
        campaign=False,
        status_is=None,
        after_time=False,
        before_time=False,
        cursor=False,
    )
    plan = await explain(pg_pool, sql, 10, recipient_hash("a@b.example"))
    # each partition's copy of intents_recipient_created_idx, searched on the digest
    assert "Index Cond: (sluice_recipient_hash(recipient) = " in plan
    assert "@" not in sql


async def test_every_listing_reads_indexes_in_order_leased_rows_included(
    pg_pool: asyncpg.Pool,
) -> None:
    # The list indexes leave leased rows out (0010), so the statement must say
    # "status <> 'leased'" for PostgreSQL to use them, and read leased rows apart.
    from sluice.ingest.listing import list_sql

    sql = list_sql(
        recipient=False,
        campaign=False,
        status_is=None,
        after_time=False,
        before_time=False,
        cursor=False,
    )
    plan = await explain(pg_pool, sql, 10)
    assert "created_at_id_idx" in plan  # a partition's copy of intents_created_idx
    assert "lease_expires_at_idx" in plan  # the leased rows, from the leased-expiry index


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(address=st.emails() | st.text(min_size=1, max_size=60).map(lambda s: s + "@exämple.com"))
async def test_python_and_postgres_agree_on_the_digest(pg_pool: asyncpg.Pool, address: str) -> None:
    # The index is built by PostgreSQL, the query parameter by Python: any disagreement
    # (an encoding, the prefix) would make recipient look-ups silently find nothing.
    address = address.replace("\x00", "")  # text cannot hold NUL
    in_sql = await pg_pool.fetchval("SELECT sluice_recipient_hash($1)", address)
    assert bytes(in_sql) == recipient_hash(address)
