"""IngestService over a real gRPC channel against a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.common.telemetry import disabled
from sluice.ingest import app
from sluice.ingest.repository import TemplateRow, upsert_template
from sluice.ingest.settings import IngestSettings
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, intent_pb2
from tests.grpc_helpers import error_info, field_violations


@pytest.fixture
async def stub(
    pg_dsn: str, pg_pool: asyncpg.Pool
) -> AsyncIterator[ingest_pb2_grpc.IngestServiceStub]:
    await upsert_template(
        pg_pool,
        TemplateRow(
            id="welcome",
            version=1,
            subject="Hi {{ name }}",
            html_body="<p>Hi {{ name }}</p>",
            text_body="Hi {{ name }}",
            variables=("name",),
            from_address="noreply@example.com",
        ),
    )
    settings = IngestSettings(
        database_url=pg_dsn,
        db_pool_size=4,
        ingest_max_loop_lag_seconds=0,
        ingest_max_waiting_calls=0,
    )
    async with (
        app.running(settings, disabled(), port=0) as handle,
        grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel,
    ):
        yield ingest_pb2_grpc.IngestServiceStub(channel)


def sub(key: str, **overrides: object) -> intent_pb2.IntentSubmission:
    fields: dict[str, object] = {
        "idempotency_key": key,
        "campaign_id": "spring",
        "recipient": "alice@example.com",
        "intent": intent_pb2.INTENT_MARKETING,
        "template_id": "welcome",
        "variables": {"name": "Alice"},
    }
    fields.update(overrides)
    return intent_pb2.IntentSubmission(**fields)  # type: ignore[arg-type]


async def count_rows(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM intents"))


async def test_submit_is_idempotent(
    stub: ingest_pb2_grpc.IngestServiceStub, pg_pool: asyncpg.Pool
) -> None:
    first = await stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=sub("k-1")))
    assert first.created
    assert uuid.UUID(first.intent.id)
    assert first.intent.status == intent_pb2.INTENT_STATUS_PENDING
    again = await stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=sub("k-1")))
    assert not again.created
    assert again.intent.id == first.intent.id
    assert again.intent.recipient == "alice@example.com"
    assert await count_rows(pg_pool) == 1


async def test_same_key_other_payload_is_already_exists(
    stub: ingest_pb2_grpc.IngestServiceStub, pg_pool: asyncpg.Pool
) -> None:
    first = await stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=sub("k-2")))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitIntent(
            ingest_pb2.SubmitIntentRequest(intent=sub("k-2", recipient="bob@example.com"))
        )
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(info.value).metadata["intent_id"] == first.intent.id
    assert await count_rows(pg_pool) == 1


async def test_invalid_input_names_fields_and_writes_nothing(
    stub: ingest_pb2_grpc.IngestServiceStub, pg_pool: asyncpg.Pool
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitIntent(
            ingest_pb2.SubmitIntentRequest(intent=sub("k-3", recipient="no-at-sign", variables={}))
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = field_violations(info.value)
    assert set(bad) == {"intent.recipient", "intent.variables['name']"}
    assert error_info(info.value).reason == "RECIPIENT_INVALID"
    assert await count_rows(pg_pool) == 0


async def test_batch_gives_a_result_per_item(
    stub: ingest_pb2_grpc.IngestServiceStub, pg_pool: asyncpg.Pool
) -> None:
    await stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=sub("b-0")))
    items = [
        sub("b-0"),  # existing
        sub("b-1", recipient="josé@exämple.com"),
        sub("b-2", recipient="broken"),
        sub("b-1", recipient="josé@exämple.com"),  # duplicate inside the batch
        sub("b-0", recipient="other@example.com"),  # key reuse with another payload
    ]
    reply = await stub.SubmitIntents(ingest_pb2.SubmitIntentsRequest(intents=items))
    r = reply.results
    assert len(r) == 5
    assert not r[0].created
    assert r[0].intent_id
    assert r[1].created
    assert r[1].intent_id
    assert r[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert r[2].error.field_violations[0].field == "intents[2].recipient"
    assert not r[2].intent_id
    assert not r[3].created
    assert r[3].intent_id == r[1].intent_id
    assert r[4].error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert await count_rows(pg_pool) == 2


async def test_batch_limits(stub: ingest_pb2_grpc.IngestServiceStub) -> None:
    for items in ([], [sub(f"x{i}") for i in range(10_001)]):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitIntents(ingest_pb2.SubmitIntentsRequest(intents=items))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "intents" in field_violations(info.value)


async def test_concurrent_single_submits_coalesce_consistently(
    stub: ingest_pb2_grpc.IngestServiceStub, pg_pool: asyncpg.Pool
) -> None:
    # 200 calls at once over 50 keys: every call for a key sees the same id, one row per key.
    calls = [
        stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=sub(f"c-{i % 50}")))
        for i in range(200)
    ]
    replies = await asyncio.gather(*calls)
    ids: dict[str, set[str]] = {}
    for reply in replies:
        ids.setdefault(reply.intent.idempotency_key, set()).add(reply.intent.id)
    assert all(len(v) == 1 for v in ids.values())
    assert sum(r.created for r in replies) == 50
    assert await count_rows(pg_pool) == 50


async def test_get_intent(stub: ingest_pb2_grpc.IngestServiceStub) -> None:
    created = await stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=sub("g-1")))
    got = await stub.GetIntent(ingest_pb2.GetIntentRequest(id=created.intent.id))
    assert got.intent.idempotency_key == "g-1"
    assert got.intent.variables["name"] == "Alice"
    for bad_id, code in (
        ("nope", grpc.StatusCode.INVALID_ARGUMENT),
        (str(uuid.uuid4()), grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetIntent(ingest_pb2.GetIntentRequest(id=bad_id))
        assert info.value.code() == code


async def test_get_intent_shows_the_routing_decision(
    stub: ingest_pb2_grpc.IngestServiceStub, pg_pool: asyncpg.Pool
) -> None:
    created = await stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=sub("g-2")))
    fresh = await stub.GetIntent(ingest_pb2.GetIntentRequest(id=created.intent.id))
    assert (fresh.intent.route_reason, fresh.intent.route_cost, fresh.intent.held_for) == (
        "",
        0.0,
        "",
    )
    # What the router records on the row (migration 0003) is what GetIntent shows.
    await pg_pool.execute(
        "UPDATE intents SET provider = 'ses', route_reason = 'ses: cheapest',"
        " route_cost = 0.0001, held_for = 'reconcile' WHERE id = $1",
        uuid.UUID(created.intent.id),
    )
    got = await stub.GetIntent(ingest_pb2.GetIntentRequest(id=created.intent.id))
    assert (got.intent.provider, got.intent.route_reason, got.intent.held_for) == (
        "ses",
        "ses: cheapest",
        "reconcile",
    )
    assert got.intent.route_cost == pytest.approx(0.0001)


async def test_list_intents_pages_without_gaps(stub: ingest_pb2_grpc.IngestServiceStub) -> None:
    await stub.SubmitIntents(
        ingest_pb2.SubmitIntentsRequest(intents=[sub(f"l-{i}") for i in range(23)])
    )
    await stub.SubmitIntents(
        ingest_pb2.SubmitIntentsRequest(
            intents=[sub(f"o-{i}", campaign_id="other") for i in range(5)]
        )
    )
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListIntents(
            ingest_pb2.ListIntentsRequest(campaign_id="spring", page_size=10, page_token=token)
        )
        pages += 1
        seen.extend(i.idempotency_key for i in page.intents)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert sorted(seen) == sorted(f"l-{i}" for i in range(23))
    first = await stub.ListIntents(
        ingest_pb2.ListIntentsRequest(campaign_id="spring", page_size=10)
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListIntents(
            ingest_pb2.ListIntentsRequest(campaign_id="other", page_token=first.next_page_token)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    pending = await stub.ListIntents(
        ingest_pb2.ListIntentsRequest(status=intent_pb2.INTENT_STATUS_SENT)
    )
    assert list(pending.intents) == []


async def test_health_and_reflection(pg_dsn: str) -> None:
    settings = IngestSettings(database_url=pg_dsn, db_pool_size=2)
    async with (
        app.running(settings, disabled(), port=0) as handle,
        grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="sluice.v1.IngestService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await handle.set_serving(False)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_template_created_after_a_rejection_works_at_once(
    stub: ingest_pb2_grpc.IngestServiceStub, pg_pool: asyncpg.Pool
) -> None:
    # The template cache keeps what exists, not what is missing: a client that creates
    # its template after a rejected submission must not wait for a cache to expire.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitIntent(
            ingest_pb2.SubmitIntentRequest(intent=sub("t-1", template_id="late"))
        )
    assert "intent.template_id" in field_violations(info.value)
    await upsert_template(
        pg_pool,
        TemplateRow(
            id="late",
            version=1,
            subject="s",
            html_body="<p>{{ name }}</p>",
            text_body="",
            variables=("name",),
            from_address="noreply@example.com",
        ),
    )
    created = await stub.SubmitIntent(
        ingest_pb2.SubmitIntentRequest(intent=sub("t-1", template_id="late"))
    )
    assert created.created
