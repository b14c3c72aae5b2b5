"""The reshaped dispatcher against real PostgreSQL and a scripted sender over real gRPC:
cancellation never causes a second send, unknown outcomes, waiting for a provider, the
circuit breaker's failover, outage holds released by a probe, and the fair-share lease."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import grpc
import pytest

from sluice.common.providers import ProviderConfig
from sluice.common.telemetry import disabled
from sluice.common.templates import TemplateCache
from sluice.router import repository
from sluice.router.dispatch import Dispatcher
from sluice.router.outcomes import RECONCILE, SENDER_TARGET
from sluice.v1 import sender_pb2, sender_pb2_grpc
from tests.conftest import InsertTemplate
from tests.router.router_fakes import PROVIDERS, FakeSender, rows, seed, serve_fake
from tests.router.test_router_dispatch import base_settings


@pytest.fixture
async def template(insert_template: InsertTemplate) -> str:
    await insert_template("other")
    return await insert_template("welcome")


@pytest.fixture
async def sender_port(fake: FakeSender) -> AsyncIterator[int]:
    async for port in serve_fake(fake):
        yield port


@pytest.fixture
async def channel(sender_port: int) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sender_port}") as ch:
        yield ch


def make(
    pg_dsn: str,
    pool: asyncpg.Pool,
    channel: grpc.aio.Channel,
    providers: tuple[ProviderConfig, ...] = PROVIDERS,
    **overrides: Any,
) -> Dispatcher:
    return Dispatcher(
        base_settings(pg_dsn, **overrides),
        pool,
        cast(Any, sender_pb2_grpc.SenderServiceStub(channel)),
        providers,
        disabled(),
        rng=random.Random(5),
    )


async def drain(dispatcher: Dispatcher, rounds: int = 20) -> None:
    for _ in range(rounds):
        if (await dispatcher.run_round()).leased == 0:
            return


def accepted_per_intent(fake: FakeSender) -> Counter[str]:
    """How many times each intent was handed to the (fake) provider and accepted."""
    return Counter(
        m.intent_id for m in fake.sent() if m.recipient.partition("@")[0].startswith("ok")
    )


# ---- cancellation --------------------------------------------------------------------


async def test_round_cancelled_during_write_back_sends_nothing_twice(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    template: str,
    fake: FakeSender,
    channel: grpc.aio.Channel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = await seed(pg_pool, [f"ok{i}@example.com" for i in range(5)])
    entered, go_on = asyncio.Event(), asyncio.Event()
    real_complete = repository.complete

    async def slow_complete(*args: Any, **kwargs: Any) -> int:
        entered.set()
        await go_on.wait()
        return await real_complete(*args, **kwargs)

    monkeypatch.setattr(repository, "complete", slow_complete)
    first = make(pg_dsn, pg_pool, channel)
    await first.start()
    await asyncio.wait_for(entered.wait(), 10)
    # stop() cancels the round while its write-back is in flight; the write-back finishes.
    stopping = asyncio.create_task(first.stop(0.0))
    await asyncio.sleep(0.2)
    go_on.set()
    await asyncio.wait_for(stopping, 10)
    monkeypatch.setattr(repository, "complete", real_complete)
    assert first.stats.released == 0
    stored = await rows(pg_pool, ids)
    assert {r["status"] for r in stored.values()} == {"sent"}
    # Another router finds nothing to send again.
    second = make(pg_dsn, pg_pool, channel)
    await drain(second)
    assert accepted_per_intent(fake) == Counter({str(i): 1 for i in ids})


async def test_round_cancelled_mid_gather_writes_what_finished_and_sends_nothing_twice(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    template: str,
    fake: FakeSender,
    channel: grpc.aio.Channel,
) -> None:
    quick = await seed(pg_pool, [f"ok{i}@example.com" for i in range(3)])
    slow = await seed(pg_pool, [f"ok-slow{i}@example.com" for i in range(2)], template_id="other")
    fake.block, fake.block_template = asyncio.Event(), "other"
    first = make(pg_dsn, pg_pool, channel)
    await first.start()
    deadline = time.monotonic() + 10
    while len(fake.calls) < 2:  # both calls are in: one answered, one held
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await first.stop(0.1)
    assert first.stats.released == 0
    stored = await rows(pg_pool, quick + slow)
    assert {stored[i]["status"] for i in quick} == {"sent"}
    for i in slow:
        # Cut short: may have reached the provider, so an attempt with an unknown outcome.
        assert (stored[i]["status"], stored[i]["attempts"]) == ("pending", 1)
        assert "outcome unknown" in stored[i]["last_error"]
    fake.block.set()
    await pg_pool.execute("UPDATE intents SET due_at = now() WHERE status = 'pending'")
    second = make(pg_dsn, pg_pool, channel)
    await drain(second)
    sends = accepted_per_intent(fake)
    # The accepted ones were never sent again; only the unknown ones were retried.
    assert {sends[str(i)] for i in quick} == {1}
    assert {sends[str(i)] for i in slow} == {2}
    assert second.stats.unknown == Counter()
    assert first.stats.unknown["cheap"] == 2


# ---- unknown outcomes ----------------------------------------------------------------


async def test_a_batch_that_always_ends_unknown_fails_after_max_attempts(
    pg_dsn: str, pg_pool: asyncpg.Pool, template: str, fake: FakeSender, channel: grpc.aio.Channel
) -> None:
    (intent_id,) = await seed(pg_pool, ["ok@example.com"])
    fake.force = sender_pb2.SEND_OUTCOME_UNKNOWN
    dispatcher = make(pg_dsn, pg_pool, channel, max_attempts=3)
    for _ in range(3):
        await pg_pool.execute("UPDATE intents SET due_at = now() WHERE id = $1", intent_id)
        await dispatcher.run_round()
    row = (await rows(pg_pool, [intent_id]))[intent_id]
    assert (row["status"], row["attempts"]) == ("failed", 3)
    assert row["last_error"].startswith("attempts exhausted (3): outcome unknown")
    assert dispatcher.stats.unknown["cheap"] == 3
    # The retry carried the same idempotency key each time (Resend dedups on it).
    assert {m.idempotency_key for m in fake.sent()} == {str(intent_id)}


async def test_unknown_outcome_under_hold_waits_for_reconciliation(
    pg_dsn: str, pg_pool: asyncpg.Pool, template: str, fake: FakeSender, channel: grpc.aio.Channel
) -> None:
    (intent_id,) = await seed(pg_pool, ["ok@example.com"])
    fake.force = sender_pb2.SEND_OUTCOME_UNKNOWN
    dispatcher = make(
        pg_dsn, pg_pool, channel, unknown_outcome_policy="hold", unknown_hold_seconds=600.0
    )
    await dispatcher.run_round()
    row = await pg_pool.fetchrow(
        "SELECT status::text, attempts, held_for, due_at - now() AS wait FROM intents "
        "WHERE id = $1",
        intent_id,
    )
    assert row is not None
    assert (row["status"], row["attempts"], row["held_for"]) == ("pending", 1, RECONCILE)
    assert row["wait"] > timedelta(seconds=590)
    assert (await dispatcher.run_round()).leased == 0


async def test_deadline_exceeded_is_an_unknown_outcome(
    pg_dsn: str, pg_pool: asyncpg.Pool, template: str, fake: FakeSender, channel: grpc.aio.Channel
) -> None:
    ids = await seed(pg_pool, ["ok1@example.com", "ok2@example.com"])
    fake.delay = 1.0
    dispatcher = make(pg_dsn, pg_pool, channel, sender_timeout_seconds=0.3)
    await dispatcher.run_round()
    assert dispatcher.stats.unknown["cheap"] == 2
    for row in (await rows(pg_pool, ids)).values():
        assert (row["status"], row["attempts"]) == ("pending", 1)
        assert row["last_error"].startswith("outcome unknown: SendBatch to cheap failed")


# ---- permanent failures and suppression ---------------------------------------------


SUPPRESSIONS_DDL = """
CREATE TABLE IF NOT EXISTS suppressions (
    address text PRIMARY KEY,
    reason text NOT NULL CHECK (reason IN
        ('hard_bounce','complaint','manual','unsubscribe','soft_bounce')),
    provider text, intent_id uuid, note text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now())
"""


async def test_hard_bounce_fails_at_once_and_suppresses_the_address(
    pg_dsn: str, pg_pool: asyncpg.Pool, template: str, channel: grpc.aio.Channel
) -> None:
    await pg_pool.execute(SUPPRESSIONS_DDL)
    (bounced,) = await seed(pg_pool, ["permanent@example.com"])
    await make(pg_dsn, pg_pool, channel).run_round()
    row = (await rows(pg_pool, [bounced]))[bounced]
    assert (row["status"], row["attempts"]) == ("failed", 1)
    entry = await pg_pool.fetchrow("SELECT * FROM suppressions")
    assert entry is not None
    assert (entry["address"], entry["reason"], entry["provider"], entry["intent_id"]) == (
        "permanent@example.com",
        "hard_bounce",
        "cheap",
        bounced,
    )


# ---- waiting for a provider, and failover ---------------------------------------------


async def test_intents_whose_only_provider_is_off_wait_and_unservable_kinds_fail(
    pg_dsn: str, pg_pool: asyncpg.Pool, template: str, fake: FakeSender, channel: grpc.aio.Channel
) -> None:
    # Only "off" (disabled) serves transactional; nothing at all serves digest here.
    providers = tuple(p for p in PROVIDERS if p.name != "cheap")
    (waiting,) = await seed(pg_pool, ["ok@example.com"], kind="transactional")
    (orphan,) = await seed(pg_pool, ["ok2@example.com"], kind="digest")
    await make(pg_dsn, pg_pool, channel, providers=providers).run_round()
    stored = await rows(pg_pool, [waiting, orphan])
    assert stored[waiting]["status"] == "pending"
    assert stored[waiting]["attempts"] == 0
    assert "waiting: no usable provider for transactional" in stored[waiting]["last_error"]
    assert stored[orphan]["status"] == "failed"
    assert stored[orphan]["last_error"] == "no configured provider serves intent digest"
    assert fake.calls == []


async def test_open_circuit_moves_traffic_to_the_next_candidate(
    pg_dsn: str, pg_pool: asyncpg.Pool, template: str, fake: FakeSender, channel: grpc.aio.Channel
) -> None:
    fake.fail_providers = {"cheap"}
    dispatcher = make(pg_dsn, pg_pool, channel, circuit_min_samples=10, max_attempts=10)
    ids = await seed(pg_pool, [f"ok{i}@example.com" for i in range(20)])
    await dispatcher.run_round()
    assert dispatcher.state.circuits.open_providers("marketing") == {"cheap"}
    fake.calls.clear()
    await pg_pool.execute("UPDATE intents SET due_at = now() WHERE status = 'pending'")
    result = await dispatcher.run_round()
    assert result.sent == 20
    assert {c.provider for c in fake.calls} == {"dear"}
    stored = await rows(pg_pool, ids)
    assert {r["provider"] for r in stored.values()} == {"dear"}
    recorded = await pg_pool.fetch("SELECT route_reason, route_cost FROM intents")
    assert all(r["route_cost"] == pytest.approx(0.0003) for r in recorded)
    assert all(r["route_reason"].startswith("dear") for r in recorded)


# ---- outages ------------------------------------------------------------------------


async def test_unreachable_sender_holds_intents_until_a_probe_reaches_it(
    pg_dsn: str, pg_pool: asyncpg.Pool, template: str, fake: FakeSender, channel: grpc.aio.Channel
) -> None:
    ids = await seed(pg_pool, [f"ok{i}@example.com" for i in range(4)])
    fake.abort, fake.capacity_down = grpc.StatusCode.UNAVAILABLE, True
    dispatcher = make(pg_dsn, pg_pool, channel, outage_hold_max_seconds=600.0)
    await dispatcher.run_round()
    held = await pg_pool.fetch("SELECT held_for, attempts FROM intents")
    assert {(r["held_for"], r["attempts"]) for r in held} == {(SENDER_TARGET, 0)}
    assert await dispatcher.probe_once() == []  # still down: nothing released
    assert (await dispatcher.run_round()).leased == 0
    fake.abort, fake.capacity_down = None, False
    assert await dispatcher.probe_once() == [SENDER_TARGET]
    stored = await rows(pg_pool, ids)
    assert all(r["due_at"] <= r["now"] for r in stored.values())
    assert dispatcher.stats.outage_released == 4
    assert (await dispatcher.run_round()).sent == 4


async def test_probe_releases_intents_held_for_a_provider(
    pg_dsn: str, pg_pool: asyncpg.Pool, template: str, fake: FakeSender, channel: grpc.aio.Channel
) -> None:
    ids = await seed(pg_pool, [f"ok{i}@example.com" for i in range(4)])
    fake.force = sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE
    fake.capacity_down = True
    dispatcher = make(pg_dsn, pg_pool, channel, outage_hold_max_seconds=600.0)
    await dispatcher.run_round()
    await asyncio.sleep(1.1)  # the outage has lasted a while: holds grow with it
    await pg_pool.execute("UPDATE intents SET due_at = now()")
    # cheap is down, so this round fails over to dear, which is down too.
    await dispatcher.run_round()
    stored = await rows(pg_pool, ids)
    assert all(r["due_at"] > r["now"] for r in stored.values())
    assert all(r["attempts"] == 0 for r in stored.values())
    assert await dispatcher.probe_once() == []  # still down: nothing released
    fake.force, fake.capacity_down = None, False
    assert sorted(await dispatcher.probe_once()) == ["cheap", "dear"]
    stored = await rows(pg_pool, ids)
    assert all(r["due_at"] <= r["now"] for r in stored.values())
    assert (await dispatcher.run_round()).sent == 4


# ---- fair share -----------------------------------------------------------------------


async def test_lease_gives_a_small_campaign_its_share_beside_a_huge_one(
    pg_pool: asyncpg.Pool, template: str
) -> None:
    old = datetime.now(UTC) - timedelta(hours=1)
    await seed(pg_pool, [f"ok{i}@example.com" for i in range(300)], campaign_id="huge", send_at=old)
    small = await seed(pg_pool, [f"ok-s{i}@example.com" for i in range(10)], campaign_id="small")
    tx = await seed(pg_pool, ["ok-tx@example.com"], kind="transactional", campaign_id="huge")
    # Strict order: the huge campaign's older backlog fills the lease.
    strict = await repository.lease(pg_pool, lease_id=uuid.uuid4(), limit=50, lease_seconds=30)
    assert {i.campaign_id for i in strict if i.kind == "marketing"} == {"huge"}
    assert tx[0] in {i.id for i in strict}
    await pg_pool.execute("UPDATE intents SET status = 'pending', lease_id = NULL")
    fair = await repository.lease(
        pg_pool, lease_id=uuid.uuid4(), limit=50, lease_seconds=30, campaign_share=0.5
    )
    by_campaign = Counter(i.campaign_id for i in fair if i.kind == "marketing")
    assert by_campaign["small"] == 10
    assert by_campaign["huge"] <= 25
    assert tx[0] in {i.id for i in fair}  # transactional first, whatever the share
    assert set(small) <= {i.id for i in fair}
    # Alone, one campaign still fills the whole lease.
    alone = await repository.lease(
        pg_pool, lease_id=uuid.uuid4(), limit=50, lease_seconds=30, campaign_share=0.5
    )
    assert len(alone) == 50


async def test_a_round_whose_lease_grew_too_old_sends_nothing_and_gives_it_back(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    template: str,
    fake: FakeSender,
    channel: grpc.aio.Channel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = await seed(pg_pool, ["ok1@example.com", "ok2@example.com"])
    real_get_many = TemplateCache.get_many

    async def stalled(self: TemplateCache, template_ids: Any) -> Any:
        await asyncio.sleep(0.8)  # a paused or starved process: past the lease's margin
        return await real_get_many(self, template_ids)

    monkeypatch.setattr(TemplateCache, "get_many", stalled)
    dispatcher = make(pg_dsn, pg_pool, channel, lease_seconds=1.0, sender_timeout_seconds=0.5)
    await dispatcher.run_round()
    assert fake.calls == []  # another router may own these by now: never send them
    assert dispatcher.stats.lease_too_old == 2
    for row in (await rows(pg_pool, ids)).values():
        assert (row["status"], row["attempts"], row["lease_id"]) == ("pending", 0, None)


async def test_intents_waiting_for_their_only_provider_flow_when_a_probe_reaches_it(
    pg_dsn: str, pg_pool: asyncpg.Pool, template: str, fake: FakeSender, channel: grpc.aio.Channel
) -> None:
    only = (dataclasses.replace(PROVIDERS[0], intents=frozenset({"marketing", "transactional"})),)
    dispatcher = make(pg_dsn, pg_pool, channel, providers=only, no_provider_wait_seconds=600.0)
    fake.force, fake.capacity_down = sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE, True
    await seed(pg_pool, ["ok-m@example.com"])
    await dispatcher.run_round()  # cheap is found down
    (urgent,) = await seed(pg_pool, ["ok-t@example.com"], kind="transactional")
    await dispatcher.run_round()
    row = await pg_pool.fetchrow(
        "SELECT held_for, due_at > now() AS later FROM intents WHERE id = $1", urgent
    )
    assert row is not None
    assert (row["held_for"], row["later"]) == ("kind:transactional", True)
    fake.force, fake.capacity_down = None, False
    assert await dispatcher.probe_once() == ["cheap"]
    stored = await rows(pg_pool, [urgent])
    assert stored[urgent]["due_at"] <= stored[urgent]["now"]
    assert (await dispatcher.run_round()).sent == 2
