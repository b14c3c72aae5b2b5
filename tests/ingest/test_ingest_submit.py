"""Idempotency (derived keys, recurring runs, concurrent retries), SubmitIntentStream,
SMTPUTF8 routing needs, and overload, over real gRPC against real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2

from sluice.v1 import ingest_pb2, ingest_pb2_grpc
from tests.grpc_helpers import error_info, status_details
from tests.ingest.ingest_stack import Ingest, count_intents, running_ingest, submission


@pytest.fixture
async def ingest(pg_dsn: str, pg_pool: asyncpg.Pool) -> AsyncIterator[Ingest]:
    async with running_ingest(pg_dsn, pg_pool) as running:
        yield running


async def test_derived_key_makes_retries_duplicates_and_next_run_new(
    ingest: Ingest, pg_pool: asyncpg.Pool
) -> None:
    week49 = submission("", campaign_id="weekly", run="2026-W49")
    first = await ingest.stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=week49))
    retry = await ingest.stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=week49))
    assert first.created
    assert not retry.created
    assert retry.intent.id == first.intent.id
    assert first.intent.idempotency_key.startswith("sluice:")
    week50 = submission("", campaign_id="weekly", run="2026-W50")
    nxt = await ingest.stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=week50))
    assert nxt.created
    assert nxt.intent.run == "2026-W50"
    # Same campaign, run and recipient, other content: the key is reused, not a new email.
    changed = submission(
        "", campaign_id="weekly", run="2026-W49", variables={"name": "B", "footer": ""}
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ingest.stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=changed))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(info.value).reason == "IDEMPOTENCY_KEY_REUSED"
    assert error_info(info.value).metadata["intent_id"] == first.intent.id
    assert await count_intents(pg_pool) == 2


async def test_no_key_and_no_campaign_is_refused(ingest: Ingest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ingest.stub.SubmitIntent(
            ingest_pb2.SubmitIntentRequest(intent=submission("", campaign_id=""))
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(info.value).reason == "FIELD_REQUIRED"


async def test_batch_reuse_carries_the_existing_id(ingest: Ingest) -> None:
    first = await ingest.stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=submission("r")))
    reply = await ingest.stub.SubmitIntents(
        ingest_pb2.SubmitIntentsRequest(
            intents=[submission("r"), submission("r", recipient="bob@example.com")]
        )
    )
    dup, reused = reply.results
    assert dup.outcome == ingest_pb2.SUBMIT_OUTCOME_DUPLICATE
    assert dup.intent_id == first.intent.id
    assert reused.outcome == ingest_pb2.SUBMIT_OUTCOME_REJECTED
    assert reused.error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert reused.error.metadata["intent_id"] == first.intent.id


KEYS = int(os.environ.get("INGEST_TEST_RETRY_KEYS", "10000"))


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_fifty_clients_retrying_ten_thousand_keys_make_ten_thousand_intents(
    pg_dsn: str, pg_pool: asyncpg.Pool
) -> None:
    keys = [f"key-{i}" for i in range(KEYS)]
    async with running_ingest(pg_dsn, pg_pool) as ingest:

        async def client(seed: int) -> set[tuple[str, str]]:
            order = keys[:]
            random.Random(seed).shuffle(order)
            seen: set[tuple[str, str]] = set()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ingest.port}") as channel:
                stub = ingest_pb2_grpc.IngestServiceStub(channel)
                for start in range(0, len(order), 1_000):
                    chunk = order[start : start + 1_000]
                    request = ingest_pb2.SubmitIntentsRequest(
                        intents=[submission(k, recipient=f"{k}@example.com") for k in chunk]
                    )
                    while True:  # a shed call is retried after its hint, as a client would
                        try:
                            reply = await stub.SubmitIntents(request)
                            break
                        except grpc.aio.AioRpcError as exc:
                            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                                raise
                            await asyncio.sleep(0.2)
                    for key, result in zip(chunk, reply.results, strict=True):
                        assert result.intent_id, result
                        seen.add((key, result.intent_id))
            return seen

        answers = await asyncio.gather(*(client(seed) for seed in range(50)))
    pairs = set().union(*answers)
    assert len(pairs) == KEYS  # every client got the same id for each key
    assert await count_intents(pg_pool) == KEYS


async def test_stream_answers_every_chunk_in_order(ingest: Ingest, pg_pool: asyncpg.Pool) -> None:
    async def chunks() -> AsyncIterator[ingest_pb2.SubmitIntentStreamRequest]:
        for c in range(5):
            items = [submission(f"s{c}-{i}", recipient=f"u{c}x{i}@example.com") for i in range(200)]
            items.append(submission("bad", recipient="nope"))
            items.append(submission("s0-0", recipient="u0x0@example.com"))  # a duplicate
            yield ingest_pb2.SubmitIntentStreamRequest(intents=items, chunk=100 + c)

    replies = [r async for r in ingest.stub.SubmitIntentStream(chunks())]
    assert [r.chunk for r in replies] == [100, 101, 102, 103, 104]
    for reply in replies:
        assert (reply.created, reply.duplicates, reply.rejected) == (200, 1, 1)
        assert reply.results[200].error.reason == "RECIPIENT_INVALID"
    assert await count_intents(pg_pool) == 1000


async def test_stream_with_an_oversized_chunk_ends_invalid_argument(
    pg_dsn: str, pg_pool: asyncpg.Pool
) -> None:
    async with running_ingest(pg_dsn, pg_pool, ingest_max_batch=10) as ingest:
        requests = [
            ingest_pb2.SubmitIntentStreamRequest(intents=[submission("a")], chunk=1),
            ingest_pb2.SubmitIntentStreamRequest(
                intents=[submission(f"b{i}") for i in range(11)], chunk=2
            ),
        ]
        call = ingest.stub.SubmitIntentStream(iter(requests))
        first = await call.read()
        assert first.created == 1
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(info.value).reason == "BATCH_TOO_LARGE"
        assert error_info(info.value).metadata["chunk"] == "2"
        assert await count_intents(pg_pool) == 1


async def test_smtputf8_is_recorded_and_refused_where_no_provider_can(
    pg_dsn: str, pg_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    providers = tmp_path / "providers.toml"
    providers.write_text(
        '[[providers]]\nname = "only-tx"\nkind = "sandbox"\ncost_per_thousand = 0.1\n'
        'intents = ["transactional"]\n'
    )
    async with running_ingest(pg_dsn, pg_pool, providers_file=str(providers)) as ingest:
        tx = submission("u1", recipient="josé@example.com", intent=1)
        stored = await ingest.stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=tx))
        assert stored.intent.smtputf8
        assert await pg_pool.fetchval("SELECT smtputf8 FROM intents") is True
        ascii_idn = await ingest.stub.SubmitIntent(
            ingest_pb2.SubmitIntentRequest(intent=submission("u2", recipient="jose@münchen.de"))
        )
        assert not ascii_idn.intent.smtputf8
        marketing = submission("u3", recipient="josé@example.com")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ingest.stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=marketing))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(info.value).reason == "SMTPUTF8_UNSUPPORTED"
    assert await count_intents(pg_pool) == 2


async def test_past_capacity_calls_are_shed_at_once_with_a_retry_hint(
    pg_dsn: str, pg_pool: asyncpg.Pool
) -> None:
    async with running_ingest(
        pg_dsn, pg_pool, ingest_max_in_flight_calls=2, ingest_retry_after_seconds=0.3
    ) as ingest:
        calls = [
            ingest.stub.SubmitIntent(
                ingest_pb2.SubmitIntentRequest(
                    intent=submission(f"o{i}", recipient=f"o{i}@example.com")
                )
            )
            for i in range(60)
        ]
        answers = await asyncio.gather(*calls, return_exceptions=True)
    shed = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    accepted = [a for a in answers if not isinstance(a, BaseException)]
    assert shed
    assert accepted
    for exc in shed:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(exc).reason == "OVERLOADED"
        retry = [
            d for d in status_details(exc).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
        ]
        info = error_details_pb2.RetryInfo()
        retry[0].Unpack(info)
        assert 0.3 <= info.retry_delay.ToTimedelta().total_seconds() <= 0.45
    assert await count_intents(pg_pool) == len(accepted)


async def test_campaign_pending_limit(pg_dsn: str, pg_pool: asyncpg.Pool) -> None:
    async with running_ingest(pg_dsn, pg_pool, ingest_max_pending_per_campaign=5) as ingest:
        reply = await ingest.stub.SubmitIntents(
            ingest_pb2.SubmitIntentsRequest(
                intents=[submission(f"p{i}", recipient=f"p{i}@example.com") for i in range(8)]
                + [submission("other", campaign_id="autumn")]
            )
        )
    outcomes = [r.outcome for r in reply.results]
    assert outcomes.count(ingest_pb2.SUBMIT_OUTCOME_CREATED) == 6
    refused = [r for r in reply.results if r.outcome == ingest_pb2.SUBMIT_OUTCOME_REJECTED]
    assert len(refused) == 3
    assert all(r.error.reason == "CAMPAIGN_PENDING_LIMIT" for r in refused)
    assert all(r.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] for r in refused)
