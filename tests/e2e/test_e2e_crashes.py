"""Promise 1 with real processes: crashes lose nothing that ingest acknowledged.

Each test submits a few hundred intents through a real ``sluice serve ingest``, lets a real
router and sender drain them through a sandbox provider that records every intent id it
accepts, and crashes one part mid-run: the router (SIGKILL), the sender (SIGKILL, restarted
on the same port) or Redis (SIGKILL of a dedicated ``redis-server``, restarted empty on the
same port). Afterwards every intent must be ``sent``, none ``failed`` and none left
``leased``. Timings are short (2 s leases, 1 s sender timeout, retries within 0.5 s) so the
recovery paths (lease expiry and reclaim, reconnects, retries) run within seconds, and so
an outage that wrongly spends attempts exhausts them within seconds too.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sluice.cli.embedded import find_free_port
from sluice.sender.providers.sandbox import SandboxLedger
from sluice.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import InsertTemplate
from tests.e2e.e2e_stack import ServiceProcess, Stack, marketing_submissions, service_stack

pytestmark = pytest.mark.e2e

PROVIDER = "e2e"  # the sandbox provider of slow_sandbox()
TOTAL = 400
WAIT_SECONDS = 30.0
BATCH_SIZE = 25
CONCURRENCY = 2
ROUTER_ENV = {
    "SLUICE_ROUTER_BATCH_SIZE": str(BATCH_SIZE),
    "SLUICE_ROUTER_CONCURRENCY": str(CONCURRENCY),
}
# The most intents one router can hold leased at once.
MAX_IN_FLIGHT = BATCH_SIZE * CONCURRENCY
# Sent intents (per the database) before the crash: the crash lands mid-run.
CRASH_AFTER_SENT = 100
DOWN_SECONDS = 1.5  # how long a killed sender or Redis stays down before its restart
REDIS_SERVER = shutil.which("redis-server")


def slow_sandbox(latency_ms: int, *, rate: int = 0) -> str:
    """The sandbox provider ``e2e``, answering each batch after ``latency_ms``: a router
    holds its leases that long, so a crash finds leases in flight. The sandbox records
    what it accepted before that wait, like a provider that took the mail and answers
    slowly. ``rate`` > 0 gives it that sustained rate and burst (far above what this box
    sends, so it never throttles): its sends then reserve tokens in Redis first."""
    return f"""
[[providers]]
name = "{PROVIDER}"
kind = "sandbox"
cost_per_thousand = 0.1
sustained_rate = {rate}
burst = {rate}
intents = ["transactional", "marketing", "digest"]
max_batch_size = 500
settings = {{ record_ids = true, latency_ms = {latency_ms} }}
"""


def crash_stack(
    database_url: str, redis_prefix: str, log_dir: Path, *, latency_ms: int, rate: int = 0
) -> contextlib.AbstractAsyncContextManager[Stack]:
    """A service stack on the slow sandbox, with short leases and fast retries, so lease
    expiry, reclaim and backoff all happen within seconds."""
    return service_stack(
        database_url=database_url,
        redis_prefix=redis_prefix,
        log_dir=log_dir,
        providers_toml=slow_sandbox(latency_ms, rate=rate),
        SLUICE_LEASE_SECONDS="2",
        SLUICE_SENDER_TIMEOUT_SECONDS="1",  # must stay below the lease
        SLUICE_RETRY_BASE_SECONDS="0.05",
        SLUICE_RETRY_MAX_SECONDS="0.5",
    )


async def submit(ingest: ServiceProcess, campaign: str, count: int) -> list[str]:
    """Submits ``count`` intents in one call; returns their ids (all newly created)."""
    submissions = marketing_submissions(campaign, count)
    async with grpc.aio.insecure_channel(ingest.target) as channel:
        answer = await ingest_pb2_grpc.IngestServiceStub(channel).SubmitIntents(
            ingest_pb2.SubmitIntentsRequest(intents=submissions), timeout=30
        )
    assert all(r.created and not r.HasField("error") for r in answer.results)
    ids = [r.intent_id for r in answer.results]
    assert len(set(ids)) == count
    return ids


async def status_counts(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT status::text AS status, count(*) AS n FROM intents GROUP BY 1")
    return {r["status"]: r["n"] for r in rows}


async def wait_until_sent(pool: asyncpg.Pool, at_least: int) -> None:
    """Polls until at least ``at_least`` intents are sent and some are leased (in flight)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        counts = await status_counts(pool)
        if counts.get("sent", 0) >= at_least and counts.get("leased", 0) > 0:
            return
        assert counts.get("sent", 0) < TOTAL, f"all sent before the crash: {counts}"
        assert time.monotonic() < deadline, f"no progress before the crash: {counts}"
        await asyncio.sleep(0.02)


async def wait_all_sent(pool: asyncpg.Pool) -> None:
    """Polls until every intent is sent; fails at once when one reaches another end state."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        counts = await status_counts(pool)
        if counts.get("sent") == TOTAL:
            return
        if not set(counts) <= {"pending", "leased", "sent"}:
            raise AssertionError(f"{counts}; for example:\n{await unsent_examples(pool)}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not all sent after {WAIT_SECONDS} s: {counts}; for example:\n"
                + await unsent_examples(pool)
            )
        await asyncio.sleep(0.1)


async def unsent_examples(pool: asyncpg.Pool) -> str:
    """A few intents that are not sent, with their attempts and last error."""
    rows = await pool.fetch(
        "SELECT status::text, attempts, last_error FROM intents WHERE status <> 'sent'"
        " ORDER BY status DESC, updated_at LIMIT 3"
    )
    return "\n".join(
        f"{r['status']} after {r['attempts']} attempts: {r['last_error']}" for r in rows
    )


async def check_final_rows(pool: asyncpg.Pool, ids: list[str]) -> list[asyncpg.Record]:
    """Every intent sent through the provider, with a message id and no lease left."""
    rows = await pool.fetch(
        "SELECT id::text, status::text, attempts, provider, provider_message_id, lease_id,"
        " lease_expires_at FROM intents"
    )
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert Counter(r["status"] for r in rows) == {"sent": TOTAL}
    assert [r["id"] for r in rows if r["lease_id"] or r["lease_expires_at"]] == []
    assert {r["provider"] for r in rows} == {PROVIDER}
    assert len({r["provider_message_id"] for r in rows}) == TOTAL
    return rows


async def test_router_killed_mid_run_its_leases_are_reclaimed_and_sent(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    redis_prefix: str,
    redis_client: aioredis.Redis,
    insert_template: InsertTemplate,
    tmp_path: Path,
) -> None:
    """Promises 1 and 5: a router SIGKILLed while it holds leases loses none of them.

    The provider answers each batch after 300 ms, so the router always has leases in
    flight; it is killed after 100 intents are sent, and the intents it held leased are
    noted. A second router must reclaim those leases when they expire and send them, so
    every intent ends ``sent`` and the provider has every id. Duplicates are allowed only
    for intents whose lease the kill cut (promise 5's window: accepted by the provider, the
    result never written), so every duplicate must be among the noted ids, at most one
    router's batch size x concurrency. Fails if the reclaimer does not return expired
    leases (intents stuck ``leased``), if a cut lease is lost, or if anything outside the
    cut leases is sent twice.
    """
    await insert_template("welcome")
    async with crash_stack(pg_dsn, redis_prefix, tmp_path, latency_ms=300) as stack:
        ingest, sender = await asyncio.gather(stack.start("ingest"), stack.start("sender"))
        router_env = {"SLUICE_SENDER_TARGET": sender.target, **ROUTER_ENV}
        doomed = await stack.start("router", name="router-killed", **router_env)
        ids = await submit(ingest, f"router-kill-{uuid.uuid4().hex[:8]}", TOTAL)

        await wait_until_sent(pg_pool, CRASH_AFTER_SENT)
        await stack.kill(doomed)
        # Nobody else runs a router now: what is leased was leased by the killed one.
        cut = {
            r["id"]
            for r in await pg_pool.fetch("SELECT id::text FROM intents WHERE status = 'leased'")
        }
        assert 0 < len(cut) <= MAX_IN_FLIGHT, len(cut)

        survivor = await stack.start("router", name="router-survivor", **router_env)
        await wait_all_sent(pg_pool)

    await check_final_rows(pg_pool, ids)
    sent_ids = await SandboxLedger(redis_client, redis_prefix).sent_ids(PROVIDER)
    assert set(sent_ids) == set(ids), "the provider is missing some intents"
    duplicates = {i for i, n in Counter(sent_ids).items() if n > 1}
    outside = sorted(duplicates - cut)
    assert not outside, f"{len(outside)} sent twice outside the cut leases, e.g. {outside[:3]}"
    assert len(sent_ids) - len(set(sent_ids)) <= len(cut)
    # The cut leases came back through the survivor's reclaimer, not some other path.
    reclaimed = [
        r for r in survivor.log_records() if str(r.get("msg", "")).startswith("reclaimed ")
    ]
    assert reclaimed, "the surviving router logged no reclaim"


async def test_sender_killed_and_restarted_burns_no_attempts(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    redis_prefix: str,
    redis_client: aioredis.Redis,
    insert_template: InsertTemplate,
    tmp_path: Path,
) -> None:
    """Promise 1: a sender SIGKILLed mid-run and restarted 1.5 s later costs no intent.

    While the sender is down the router's SendBatch calls fail UNAVAILABLE, which must put
    the intents back without spending an attempt: the router retries them hundreds of
    times during the outage, so an outage that spent attempts would exhaust them
    (``failed``). A call cut mid-flight by the kill may instead time out, which counts one
    attempt, so every intent must end ``sent`` with at most 2 attempts, and the provider
    must have every id (those it accepted in the calls the kill cut, twice: promise 5's
    window). Fails if UNAVAILABLE spends attempts, or if intents are lost or left leased.
    """
    await insert_template("welcome")
    async with crash_stack(pg_dsn, redis_prefix, tmp_path, latency_ms=100) as stack:
        ingest, sender = await asyncio.gather(stack.start("ingest"), stack.start("sender"))
        await stack.start("router", SLUICE_SENDER_TARGET=sender.target, **ROUTER_ENV)
        ids = await submit(ingest, f"sender-kill-{uuid.uuid4().hex[:8]}", TOTAL)

        await wait_until_sent(pg_pool, CRASH_AFTER_SENT)
        await stack.kill(sender)
        await asyncio.sleep(DOWN_SECONDS)
        sent_while_down = (await status_counts(pg_pool)).get("sent", 0)
        await stack.restart(sender)
        await wait_all_sent(pg_pool)

    assert sent_while_down < TOTAL, "the outage came too late to matter"
    rows = await check_final_rows(pg_pool, ids)
    attempts = Counter(r["attempts"] for r in rows)
    assert max(attempts) <= 2, f"attempts per intent: {dict(attempts)}"
    sent_ids = await SandboxLedger(redis_client, redis_prefix).sent_ids(PROVIDER)
    assert set(sent_ids) == set(ids), "the provider is missing some intents"
    assert len(sent_ids) >= TOTAL


class RedisServer:
    """A throwaway ``redis-server`` on a fixed port that keeps nothing on disk."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Starts it (again, empty) on its port and waits until it answers PING."""
        assert REDIS_SERVER is not None
        with self.log_path.open("ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                REDIS_SERVER,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        client = aioredis.Redis(host="127.0.0.1", port=self.port)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(RedisError, OSError):
                    if await client.ping():
                        return
                assert self.proc.returncode is None, self.log_path.read_text()
                assert time.monotonic() < deadline, "redis-server did not answer PING"
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL: a crash, and everything it held is gone."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@contextlib.asynccontextmanager
async def redis_server(log_path: Path) -> AsyncIterator[RedisServer]:
    """A started :class:`RedisServer` on a free port, killed on exit."""
    server = RedisServer(find_free_port(), log_path)
    try:
        await server.start()
        yield server
    finally:
        await server.kill()


@pytest.mark.skipif(REDIS_SERVER is None, reason="needs a redis-server binary")
@pytest.mark.parametrize(
    "rate",
    [
        pytest.param(0, id="unlimited"),
        pytest.param(100_000, id="rate-limited"),
    ],
)
async def test_redis_killed_and_restarted_loses_nothing(
    rate: int,
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    redis_prefix: str,
    insert_template: InsertTemplate,
    tmp_path: Path,
) -> None:
    """Promise 1: Redis SIGKILLed mid-run and restarted empty 1.5 s later costs no intent.

    The sender keeps its limiter and the sandbox its ledger in a Redis of this test's own;
    it is killed after 100 intents are sent and restarted on the same port with no data.
    The sender must reconnect by itself, and every intent must end ``sent``, none
    ``failed``, none left leased, with at most 2 attempts (a batch whose tokens were
    reserved just before the kill may fail at the provider: one attempt). The sandbox
    ledger dies with Redis, so sends are counted in the database (one provider message id
    per intent). Fails if the sender cannot reconnect (intents stay pending), or if the
    outage spends attempts until intents are ``failed``.

    ``rate-limited``: every send reserves tokens in Redis first; with Redis down the
    reservation fails, SendBatch answers UNAVAILABLE and the router spends no attempt.
    ``unlimited``: no reservation, so the sandbox's own ledger write is the first thing to
    fail; the adapter raises Unavailable, the sender answers PROVIDER_UNAVAILABLE per
    message, and the router retries with a per-provider outage backoff, spending no attempt
    (this case found that bug: it used to answer TRANSIENT_FAILURE and burn attempts).
    """
    await insert_template("welcome")
    async with (
        redis_server(tmp_path / "redis-server.log") as redis,
        crash_stack(pg_dsn, redis_prefix, tmp_path, latency_ms=100, rate=rate) as stack,
    ):
        ingest, sender = await asyncio.gather(
            stack.start("ingest"), stack.start("sender", REDIS_URL=redis.url)
        )
        await stack.start("router", SLUICE_SENDER_TARGET=sender.target, **ROUTER_ENV)
        ids = await submit(ingest, f"redis-kill-{uuid.uuid4().hex[:8]}", TOTAL)

        await wait_until_sent(pg_pool, CRASH_AFTER_SENT)
        await redis.kill()
        await asyncio.sleep(DOWN_SECONDS)
        sent_while_down = (await status_counts(pg_pool)).get("sent", 0)
        await redis.start()
        await wait_all_sent(pg_pool)

    assert sent_while_down < TOTAL, "the outage came too late to matter"
    rows = await check_final_rows(pg_pool, ids)
    attempts = Counter(r["attempts"] for r in rows)
    assert max(attempts) <= 2, f"attempts per intent: {dict(attempts)}"
