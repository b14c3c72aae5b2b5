"""Idempotency against a model (hypothesis): any sequence of batches over a few keys and
contents gives, per key, one row, one id, duplicates for the first content and
IDEMPOTENCY_KEY_REUSED for any other; over real gRPC and real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.v1 import ingest_pb2
from tests.ingest.ingest_stack import Ingest, running_ingest, submission


@pytest.fixture
async def ingest(pg_dsn: str, pg_pool: asyncpg.Pool) -> AsyncIterator[Ingest]:
    async with running_ingest(pg_dsn, pg_pool) as running:
        yield running


# (key or None for a derived one, recipient, name variable)
item = st.tuples(
    st.sampled_from(["a", "b", "c", None]),
    st.sampled_from(["x@example.com", "y@example.com"]),
    st.sampled_from(["Ann", "Bob"]),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=st.lists(st.lists(item, min_size=1, max_size=6), min_size=1, max_size=4))
async def test_batches_agree_with_the_model(
    ingest: Ingest, pg_pool: asyncpg.Pool, batches: list[list[tuple[str | None, str, str]]]
) -> None:
    await pg_pool.execute("TRUNCATE intents, intent_keys")
    first: dict[str, tuple[str, str]] = {}  # key -> content it was stored with
    ids: dict[str, str] = {}
    for batch in batches:
        subs = [
            submission(key or "", recipient=r, variables={"name": n, "footer": ""})
            for key, r, n in batch
        ]
        reply = await ingest.stub.SubmitIntents(ingest_pb2.SubmitIntentsRequest(intents=subs))
        for (key, recipient, name), result in zip(batch, reply.results, strict=True):
            # A derived key covers campaign, run, recipient and template, not the variables.
            model_key = key if key is not None else f"derived:{recipient}"
            content = (recipient, name)
            if model_key not in first:
                first[model_key] = content
                assert result.outcome == ingest_pb2.SUBMIT_OUTCOME_CREATED, result
                ids[model_key] = result.intent_id
            elif first[model_key] == content:
                assert result.outcome == ingest_pb2.SUBMIT_OUTCOME_DUPLICATE, result
                assert result.intent_id == ids[model_key]
            else:
                assert result.outcome == ingest_pb2.SUBMIT_OUTCOME_REJECTED, result
                assert result.error.reason == "IDEMPOTENCY_KEY_REUSED"
                assert result.error.metadata["intent_id"] == ids[model_key]
    assert await pg_pool.fetchval("SELECT count(*) FROM intents") == len(first)
