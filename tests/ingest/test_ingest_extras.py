"""Reply-to, headers and tags through IngestService over real gRPC and PostgreSQL: stored and
shown by GetIntent, part of the idempotency content, refused with the exact field in every
submit RPC, and NULL on rows that do not carry them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from sluice.v1 import ingest_pb2, intent_pb2
from tests.grpc_helpers import error_info, field_violations
from tests.ingest.ingest_stack import Ingest, count_intents, running_ingest, submission

EXTRAS: dict[str, object] = {
    "reply_to": "Help@example.com",
    "headers": {"X-Campaign": "spring", "List-Id": "<news.example.com>"},
    "tags": {"cohort": "b", "plan": "gold"},
}


@pytest.fixture
async def ingest(pg_dsn: str, pg_pool: asyncpg.Pool) -> AsyncIterator[Ingest]:
    async with running_ingest(pg_dsn, pg_pool) as running:
        yield running


async def test_extras_are_stored_and_shown(ingest: Ingest, pg_pool: asyncpg.Pool) -> None:
    reply = await ingest.stub.SubmitIntent(
        ingest_pb2.SubmitIntentRequest(intent=submission("x-1", **EXTRAS))
    )
    got = await ingest.stub.GetIntent(ingest_pb2.GetIntentRequest(id=reply.intent.id))
    for shown in (reply.intent, got.intent):
        assert shown.reply_to == "Help@example.com"
        assert dict(shown.headers) == EXTRAS["headers"]
        assert dict(shown.tags) == EXTRAS["tags"]
    row = await pg_pool.fetchrow(
        "SELECT reply_to, headers, tags FROM intents WHERE id = $1::uuid", reply.intent.id
    )
    assert dict(row) == EXTRAS


async def test_an_intent_without_extras_stores_nulls(ingest: Ingest, pg_pool: asyncpg.Pool) -> None:
    reply = await ingest.stub.SubmitIntents(
        ingest_pb2.SubmitIntentsRequest(intents=[submission("plain-1"), submission("plain-2")])
    )
    assert [r.outcome for r in reply.results] == [ingest_pb2.SUBMIT_OUTCOME_CREATED] * 2
    nulls = await pg_pool.fetchval(
        "SELECT count(*) FROM intents WHERE reply_to IS NULL AND headers IS NULL AND tags IS NULL"
    )
    assert nulls == 2
    got = await ingest.stub.GetIntent(ingest_pb2.GetIntentRequest(id=reply.results[0].intent_id))
    assert (got.intent.reply_to, dict(got.intent.headers), dict(got.intent.tags)) == ("", {}, {})


@pytest.mark.parametrize(
    "changed",
    [
        {"reply_to": "other@example.com"},
        {"headers": {"X-Campaign": "autumn", "List-Id": "<news.example.com>"}},
        {"tags": {"cohort": "c", "plan": "gold"}},
        {"tags": {}},
    ],
)
async def test_same_key_with_other_extras_is_a_reused_key(
    ingest: Ingest, pg_pool: asyncpg.Pool, changed: dict[str, object]
) -> None:
    first = await ingest.stub.SubmitIntent(
        ingest_pb2.SubmitIntentRequest(intent=submission("x-2", **EXTRAS))
    )
    again = await ingest.stub.SubmitIntent(
        ingest_pb2.SubmitIntentRequest(intent=submission("x-2", **EXTRAS))
    )
    assert (again.created, again.intent.id) == (False, first.intent.id)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ingest.stub.SubmitIntent(
            ingest_pb2.SubmitIntentRequest(intent=submission("x-2", **{**EXTRAS, **changed}))
        )
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(info.value).reason == "IDEMPOTENCY_KEY_REUSED"
    assert error_info(info.value).metadata["intent_id"] == first.intent.id
    assert await count_intents(pg_pool) == 1


async def test_a_bad_header_is_refused_with_its_field(
    ingest: Ingest, pg_pool: asyncpg.Pool
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ingest.stub.SubmitIntent(
            ingest_pb2.SubmitIntentRequest(
                intent=submission("x-3", headers={"Bcc": "thief@example.com"})
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(info.value)) == ["intent.headers['Bcc']"]
    assert error_info(info.value).reason == "HEADER_NOT_ALLOWED"
    assert await count_intents(pg_pool) == 0


def batch() -> list[intent_pb2.IntentSubmission]:
    items = [submission(f"b-{i}", **EXTRAS) for i in range(5)]
    items[3].headers["X-Foo"] = "one\r\nBcc: thief@example.com"
    return items


def assert_only_item_3_rejected(results: list[ingest_pb2.SubmitIntentResult]) -> None:
    assert [r.outcome for r in results] == [ingest_pb2.SUBMIT_OUTCOME_CREATED] * 3 + [
        ingest_pb2.SUBMIT_OUTCOME_REJECTED,
        ingest_pb2.SUBMIT_OUTCOME_CREATED,
    ]
    error = results[3].error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error.reason == "CONTROL_CHARACTERS"
    assert [v.field for v in error.field_violations] == ["intents[3].headers['X-Foo']"]


async def test_batch_and_stream_name_the_bad_item(ingest: Ingest, pg_pool: asyncpg.Pool) -> None:
    reply = await ingest.stub.SubmitIntents(ingest_pb2.SubmitIntentsRequest(intents=batch()))
    assert_only_item_3_rejected(list(reply.results))
    await pg_pool.execute("DELETE FROM intents")
    await pg_pool.execute("DELETE FROM intent_keys")
    request = ingest_pb2.SubmitIntentStreamRequest(intents=batch(), chunk=1)
    [chunk] = [r async for r in ingest.stub.SubmitIntentStream(iter([request]))]
    assert_only_item_3_rejected(list(chunk.results))
    stored = await pg_pool.fetch("SELECT reply_to, headers, tags FROM intents")
    assert [dict(r) for r in stored] == [EXTRAS] * 4
