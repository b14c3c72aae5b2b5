"""A flood of calls gets answers, never CANCELLED: OK, or RESOURCE_EXHAUSTED with a hint.

gRPC core holds calls the process has not taken up yet; past its backlog bound it cancels
them, and a client sees CANCELLED, a code that says nothing about coming back. Thousands of
calls started at once are such a backlog: the process takes them up one by one.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import asyncpg
import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.common.grpcserver import GrpcListener
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
        pg_dsn,
        pg_pool,
        ingest_max_in_flight_calls=4,
        ingest_max_waiting_calls=100,
        ingest_retry_after_seconds=0.2,
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
        # Once the backlog is gone, ingest takes calls again. (How many of the flood itself
        # got in depends on how fast this machine drains it: on a loaded one, all of them
        # can be refused before admission's next reading of the backlog.)
        after = None
        for _ in range(50):  # as a client would: come back after the hint
            try:
                after = await ingest.stub.SubmitIntent(
                    ingest_pb2.SubmitIntentRequest(
                        intent=submission("after", recipient="after@example.com")
                    ),
                    timeout=30,
                )
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                await asyncio.sleep(_retry_after(exc))
    assert after is not None
    assert after.intent.id
    codes = Counter(
        a.code().name if isinstance(a, grpc.aio.AioRpcError) else type(a).__name__ for a in answers
    )
    assert set(codes) <= {"SubmitIntentResponse", "RESOURCE_EXHAUSTED"}, codes
    for exc in answers:
        if isinstance(exc, grpc.aio.AioRpcError):
            assert error_info(exc).reason == "OVERLOADED"
            assert 0.2 <= _retry_after(exc) <= 0.3
    stored = await pg_pool.fetchval("SELECT count(*) FROM intents")
    assert stored == codes["SubmitIntentResponse"] + 1  # and the one after


async def test_the_listener_counts_the_calls_waiting_in_grpc_core() -> None:
    listener = GrpcListener("127.0.0.1", 0, service_names=[])
    port = await listener.start()
    try:
        assert listener.waiting_calls() == 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            calls = [
                asyncio.ensure_future(stub.Check(health_pb2.HealthCheckRequest()))
                for _ in range(300)
            ]
            for _ in range(20):  # let every call go out
                await asyncio.sleep(0)
            # The loop that would take them up is held: they wait in gRPC core.
            time.sleep(1.0)  # noqa: ASYNC251  (blocks the loop on purpose)
            held = listener.waiting_calls()
            await asyncio.gather(*calls)
        assert held is not None
        assert held > 100
        deadline = time.monotonic() + 10
        while listener.waiting_calls() and time.monotonic() < deadline:  # noqa: ASYNC110  (polls a counter)
            await asyncio.sleep(0.02)
        assert listener.waiting_calls() == 0
    finally:
        await listener.stop(0)
