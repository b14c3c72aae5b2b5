"""A flood of calls gets answers, never CANCELLED: OK, or RESOURCE_EXHAUSTED with a hint.

gRPC core holds calls the process has not taken up yet; past its backlog bound it cancels
them, and a client sees CANCELLED, a code that says nothing about coming back. Thousands of
calls started at once are such a backlog: the process takes them up one by one.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
import grpc
from google.rpc import error_details_pb2

from sluice.v1 import ingest_pb2
from tests.grpc_helpers import error_info, status_details
from tests.ingest.ingest_stack import running_ingest, submission

FLOOD = 2_500  # above gRPC's default backlog bound, 1,000 (random refusals from there on)


def _retry_after(exc: grpc.aio.AioRpcError) -> float:
    for detail in status_details(exc).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    raise AssertionError("no RetryInfo detail")


async def test_a_flood_is_answered_ok_or_resource_exhausted_with_a_hint_never_cancelled(
    pg_dsn: str, pg_pool: asyncpg.Pool
) -> None:
    async with running_ingest(
        pg_dsn, pg_pool, ingest_max_in_flight_calls=4, ingest_retry_after_seconds=0.2
    ) as ingest:
        # Every call started before the server takes up the first: a backlog in gRPC core.
        calls = [
            ingest.stub.SubmitIntent(
                ingest_pb2.SubmitIntentRequest(
                    intent=submission(f"f{i}", recipient=f"f{i}@example.com")
                ),
                timeout=120,
            )
            for i in range(FLOOD)
        ]
        answers = await asyncio.gather(*calls, return_exceptions=True)
    codes = Counter(
        a.code().name if isinstance(a, grpc.aio.AioRpcError) else type(a).__name__ for a in answers
    )
    assert set(codes) <= {"SubmitIntentResponse", "RESOURCE_EXHAUSTED"}, codes
    assert codes["SubmitIntentResponse"] > 0
    for exc in answers:
        if isinstance(exc, grpc.aio.AioRpcError):
            assert error_info(exc).reason == "OVERLOADED"
            assert 0.2 <= _retry_after(exc) <= 0.3
    assert await pg_pool.fetchval("SELECT count(*) FROM intents") == codes["SubmitIntentResponse"]
