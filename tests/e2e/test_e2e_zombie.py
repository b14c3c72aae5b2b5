"""Promise 3 with real router processes: a router paused past its lease changes nothing.

Router A leases the backlog and calls SendBatch; the test then freezes it (SIGSTOP) with the
call in flight. Its lease runs out, router B reclaims the intents and sends them all. When
A is resumed, its call has long passed its deadline (an unknown outcome) and its write-back
names a lease that no longer owns any row: 0 rows changed, and every intent was handed to
a provider exactly once. Each router talks to its own scripted sender (a real gRPC server
in this process), so the test knows which router sent what; A's sender holds its calls
unanswered, standing for a provider that had not accepted them yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import InsertTemplate
from tests.e2e.e2e_stack import service_stack
from tests.router.router_fakes import FakeSender, seed, serve_fake

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROVIDERS_TOML = """
[[providers]]
name = "cheap"
kind = "sandbox"
cost_per_thousand = 0.1
sustained_rate = 0
burst = 0
intents = ["marketing"]
"""
ROUTER_ENV = {
    "SLUICE_LEASE_SECONDS": "2",
    "SLUICE_SENDER_TIMEOUT_SECONDS": "1",
    "SLUICE_ROUTER_CONCURRENCY": "1",
}
SNAPSHOT_SQL = (
    "SELECT id, status::text, attempts, lease_id, provider_message_id, updated_at"
    " FROM intents ORDER BY id"
)


async def test_router_paused_past_its_lease_changes_no_row_and_sends_nothing_twice(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    redis_prefix: str,
    insert_template: InsertTemplate,
    tmp_path: Path,
) -> None:
    await insert_template("welcome")
    ids = await seed(pg_pool, [f"ok{i}@example.com" for i in range(20)])
    fake_a = FakeSender(block=asyncio.Event())  # holds A's calls unanswered
    fake_b = FakeSender()
    serving = contextlib.asynccontextmanager(serve_fake)
    async with (
        serving(fake_a) as port_a,
        serving(fake_b) as port_b,
        service_stack(
            database_url=pg_dsn,
            redis_prefix=redis_prefix,
            log_dir=tmp_path,
            providers_toml=PROVIDERS_TOML,
        ) as stack,
    ):
        a = await stack.start(
            "router", name="router-a", SLUICE_SENDER_TARGET=f"127.0.0.1:{port_a}", **ROUTER_ENV
        )
        await asyncio.wait_for(fake_a.received.wait(), 10)
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            leased_by_a = {m.intent_id for m in fake_a.sent()}
            assert leased_by_a == {str(i) for i in ids}
            await stack.start(
                "router",
                name="router-b",
                SLUICE_SENDER_TARGET=f"127.0.0.1:{port_b}",
                **ROUTER_ENV,
            )
            deadline = time.monotonic() + 30
            while await pg_pool.fetchval(
                "SELECT count(*) FROM intents WHERE status = 'sent'"
            ) < len(ids):
                assert time.monotonic() < deadline, "router B did not finish"
                await asyncio.sleep(0.1)
            before = [dict(r) for r in await pg_pool.fetch(SNAPSHOT_SQL)]
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        # A wakes up: its call times out (unknown outcome) and it writes back.
        deadline = time.monotonic() + 15
        while "results not written: the lease was lost" not in a.log_text():
            assert time.monotonic() < deadline, a.log_text()[-2000:]
            await asyncio.sleep(0.1)
        after = [dict(r) for r in await pg_pool.fetch(SNAPSHOT_SQL)]
    assert after == before  # 0 rows changed by the zombie
    assert {r["status"] for r in after} == {"sent"}
    assert {r["attempts"] for r in after} == {1}
    # Accepted by a provider exactly once each: B's; A's calls were never answered.
    assert Counter(m.intent_id for m in fake_b.sent()) == Counter({str(i): 1 for i in ids})
