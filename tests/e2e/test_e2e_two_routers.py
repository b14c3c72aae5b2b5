"""Promise 3 with real processes: two routers draining one queue never send an intent twice.

Two ``sluice serve router`` processes (four workers each, small batches so their leases
interleave many times) share one PostgreSQL queue, one sender and an unlimited sandbox
provider that records every intent id it accepts. If two leases ever covered the same
intent, both routers would send it and the sandbox would hold its id twice; the database
alone could not show it, because the second write-back finds the lease no longer its own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis

from sluice.sender.providers.sandbox import SandboxLedger
from sluice.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import InsertTemplate
from tests.e2e.e2e_stack import ServiceProcess, marketing_submissions, service_stack

pytestmark = pytest.mark.e2e

PROVIDER = "e2e"  # the unlimited sandbox of e2e_stack.UNLIMITED_PROVIDERS
TOTAL = 5_000
PER_CALL = 1_000
WAIT_SECONDS = 90.0
# Small batches: 50 leases for 5,000 intents, eight workers competing for them.
ROUTER_ENV = {"SLUICE_ROUTER_BATCH_SIZE": "100", "SLUICE_ROUTER_CONCURRENCY": "4"}


def router_sent(router: ServiceProcess) -> int:
    """What the router says it sent, from its "dispatcher stopped" log record."""
    stopped = [r for r in router.log_records() if r.get("msg") == "dispatcher stopped"]
    assert len(stopped) == 1, f"{router.name} logged no clean dispatcher stop"
    return int(stopped[0]["sent"])


async def test_two_routers_on_5000_intents_never_send_one_twice(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    redis_prefix: str,
    redis_client: aioredis.Redis,
    insert_template: InsertTemplate,
    tmp_path: Path,
) -> None:
    await insert_template("welcome")
    campaign = f"two-routers-{uuid.uuid4().hex[:8]}"
    async with service_stack(
        database_url=pg_dsn, redis_prefix=redis_prefix, log_dir=tmp_path
    ) as stack:
        ingest, sender = await asyncio.gather(stack.start("ingest"), stack.start("sender"))
        # Both routers are polling before the first intent exists, so neither gets a head start.
        routers = await asyncio.gather(
            *(
                stack.start("router", name=name, SLUICE_SENDER_TARGET=sender.target, **ROUTER_ENV)
                for name in ("router-a", "router-b")
            )
        )

        ids: list[str] = []
        async with grpc.aio.insecure_channel(ingest.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            for start in range(0, TOTAL, PER_CALL):
                answer = await stub.SubmitIntents(
                    ingest_pb2.SubmitIntentsRequest(
                        intents=marketing_submissions(campaign, PER_CALL, start=start)
                    ),
                    timeout=30,
                )
                assert all(r.created and not r.HasField("error") for r in answer.results)
                ids.extend(r.intent_id for r in answer.results)
        assert len(set(ids)) == TOTAL

        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            counts: dict[str, int] = {
                r["status"]: r["n"]
                for r in await pg_pool.fetch(
                    "SELECT status::text AS status, count(*) AS n FROM intents GROUP BY 1"
                )
            }
            if counts.get("sent") == TOTAL:
                break
            assert set(counts) <= {"pending", "leased", "sent"}, counts
            assert time.monotonic() < deadline, f"not all sent after {WAIT_SECONDS} s: {counts}"
            await asyncio.sleep(0.2)

    # The provider's side: every intent accepted exactly once, and nothing else.
    ledger = SandboxLedger(redis_client, redis_prefix)
    sent_ids = await ledger.sent_ids(PROVIDER)
    duplicates = len(sent_ids) - len(set(sent_ids))
    assert duplicates == 0, f"{duplicates} intents were sent more than once"
    assert len(sent_ids) == TOTAL
    assert set(sent_ids) == set(ids)
    assert await ledger.sent_count(PROVIDER) == TOTAL

    # The database's side: one attempt each, a provider message id each, no lease left.
    rows = await pg_pool.fetch(
        "SELECT id::text, status::text, attempts, provider, provider_message_id, lease_id"
        " FROM intents"
    )
    assert {r["id"] for r in rows} == set(ids)
    assert all(r["status"] == "sent" for r in rows)
    assert [r["id"] for r in rows if r["attempts"] != 1] == []
    assert all(r["provider"] == PROVIDER and r["lease_id"] is None for r in rows)
    assert len({r["provider_message_id"] for r in rows}) == TOTAL

    # Both routers did part of the work, and together exactly all of it.
    per_router = {r.name: router_sent(r) for r in routers}
    assert sum(per_router.values()) == TOTAL, per_router
    assert all(n > 0 for n in per_router.values()), per_router
