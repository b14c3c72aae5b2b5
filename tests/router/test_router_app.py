"""The router as a running service: RouterService over a real channel, the dispatcher
started by ``running()``, and its shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.common.grpcserver import GrpcListener
from sluice.common.telemetry import disabled
from sluice.router.app import SERVICE_NAME, running
from sluice.router.health import ProviderHealthTracker
from sluice.router.service import RouterServicer
from sluice.router.settings import RouterSettings
from sluice.v1 import intent_pb2, router_pb2, router_pb2_grpc
from tests.router.router_fakes import PROVIDERS, FakeSender, rows, seed, serve_fake

PROVIDERS_TOML = """
[[providers]]
name = "cheap"
cost_per_thousand = 0.10
intents = ["marketing", "digest"]

[[providers]]
name = "dear"
cost_per_thousand = 0.30
sustained_rate = 10
burst = 20
max_batch_size = 50
intents = ["marketing"]

[[providers]]
name = "off"
cost_per_thousand = 0.01
intents = ["marketing", "transactional"]
enabled = false
"""


@pytest.fixture
async def sender_port(fake: FakeSender) -> AsyncIterator[int]:
    async for port in serve_fake(fake):
        yield port


@pytest.fixture
def settings(pg_dsn: str, sender_port: int, tmp_path: Path) -> RouterSettings:
    providers = tmp_path / "providers.toml"
    providers.write_text(PROVIDERS_TOML, encoding="utf-8")
    values: dict[str, Any] = {
        "database_url": pg_dsn,
        "sender_target": f"127.0.0.1:{sender_port}",
        "providers_file": str(providers),
        "router_concurrency": 2,
        "router_idle_sleep": 0.02,
        "lease_seconds": 5.0,
        "sender_timeout_seconds": 2.0,
        "shutdown_grace_seconds": 0.5,
        "db_pool_size": 4,
    }
    result = RouterSettings(**values)
    result.validate()
    return result


async def wait_for_status(
    pool: asyncpg.Pool, ids: list[Any], status: str, within: float = 10.0
) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        statuses = {r["status"] for r in (await rows(pool, ids)).values()}
        if statuses == {status}:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still {statuses}, wanted {status}")
        await asyncio.sleep(0.05)


async def test_running_router_sends_and_reports_over_grpc(
    settings: RouterSettings, pg_pool: asyncpg.Pool, template: str, fake: FakeSender
) -> None:
    ok = await seed(pg_pool, [f"ok{i}@example.com" for i in range(5)])
    throttled = await seed(pg_pool, ["throttle@example.com"])
    orphan = await seed(pg_pool, ["ok@example.com"], kind="transactional")
    async with running(settings, disabled(), port=0) as handle:
        await wait_for_status(pg_pool, ok, "sent")
        await wait_for_status(pg_pool, orphan, "pending")
        await wait_for_status(pg_pool, throttled, "pending")
        # Its only provider is disabled: it waits for it (or its deadline), with the reason.
        (waiting,) = (await rows(pg_pool, orphan)).values()
        assert waiting["status"] == "pending"
        assert waiting["last_error"] == (
            "waiting: no usable provider for transactional (paused or disabled)"
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = router_pb2_grpc.RouterServiceStub(channel)
            stats = await stub.GetQueueStats(router_pb2.GetQueueStatsRequest())
            providers = await stub.ListProviders(router_pb2.ListProvidersRequest())
    counts = {(c.status, c.intent, c.provider): c.count for c in stats.counts}
    assert counts == {
        (intent_pb2.INTENT_STATUS_SENT, intent_pb2.INTENT_MARKETING, "cheap"): 5,
        (intent_pb2.INTENT_STATUS_PENDING, intent_pb2.INTENT_MARKETING, "cheap"): 1,
        (intent_pb2.INTENT_STATUS_PENDING, intent_pb2.INTENT_TRANSACTIONAL, ""): 1,
    }
    assert stats.due == 0  # the throttled one waits for its retry-after
    assert stats.oldest_due_age.seconds == 0
    by_name = {p.name: p for p in providers.providers}
    assert list(by_name) == ["cheap", "dear", "off"]
    cheap, dear, off = by_name["cheap"], by_name["dear"], by_name["off"]
    assert cheap.health == router_pb2.PROVIDER_HEALTH_HEALTHY
    assert cheap.success_rate == 1.0
    assert list(cheap.intents) == [intent_pb2.INTENT_MARKETING, intent_pb2.INTENT_DIGEST]
    assert (dear.sustained_rate, dear.burst, dear.max_batch_size) == (10.0, 20, 50)
    assert dear.cost_per_thousand == pytest.approx(0.30)
    assert dear.kind == "sandbox"
    assert off.health == router_pb2.PROVIDER_HEALTH_DISABLED
    assert not off.enabled
    # Each message went to the sender once.
    assert sorted(m.intent_id for m in fake.sent()) == sorted(str(i) for i in ok + throttled)


async def test_leaving_running_settles_unfinished_rounds_without_releasing_sent_ones(
    settings: RouterSettings, pg_pool: asyncpg.Pool, template: str, fake: FakeSender
) -> None:
    fake.block = asyncio.Event()
    ids = await seed(pg_pool, [f"ok{i}@example.com" for i in range(4)])
    started = asyncio.get_running_loop().time()
    async with running(settings, disabled(), port=0):
        await asyncio.wait_for(fake.received.wait(), 5)
        await wait_for_status(pg_pool, ids, "leased")
        started = asyncio.get_running_loop().time()
    # Bounded by the grace period (0.5 s), plus a little for the release itself.
    assert asyncio.get_running_loop().time() - started < 3.0
    # The call reached the sender, so its outcome is unknown: an attempt, never a release.
    for row in (await rows(pg_pool, ids)).values():
        assert (row["status"], row["attempts"], row["lease_id"]) == ("pending", 1, None)
        assert "round cancelled" in row["last_error"]


@pytest.fixture
async def router_stub(pg_pool: asyncpg.Pool) -> AsyncIterator[router_pb2_grpc.RouterServiceStub]:
    health = ProviderHealthTracker(PROVIDERS, min_samples=5)
    health.record("dear", accepted=1, failed=9)
    handle = GrpcListener("127.0.0.1", 0, service_names=[SERVICE_NAME])
    router_pb2_grpc.add_RouterServiceServicer_to_server(
        RouterServicer(pg_pool, PROVIDERS, health), handle.server
    )
    port = await handle.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield router_pb2_grpc.RouterServiceStub(channel)
    finally:
        await handle.stop(0)


async def test_queue_stats_count_the_due_backlog_per_campaign(
    router_stub: router_pb2_grpc.RouterServiceStub, pg_pool: asyncpg.Pool, template: str
) -> None:
    now = datetime.now(UTC)
    await seed(pg_pool, ["a@example.com", "b@example.com"], send_at=now - timedelta(minutes=10))
    await seed(pg_pool, ["c@example.com"], campaign_id="autumn", send_at=now - timedelta(minutes=1))
    await seed(pg_pool, ["d@example.com"], campaign_id="autumn", send_at=now + timedelta(hours=1))
    everything = await router_stub.GetQueueStats(router_pb2.GetQueueStatsRequest())
    assert everything.due == 3
    assert 600 <= everything.oldest_due_age.seconds < 660
    autumn = await router_stub.GetQueueStats(router_pb2.GetQueueStatsRequest(campaign_id="autumn"))
    assert autumn.due == 1
    assert 60 <= autumn.oldest_due_age.seconds < 120
    assert [(c.status, c.intent, c.provider, c.count) for c in autumn.counts] == [
        (intent_pb2.INTENT_STATUS_PENDING, intent_pb2.INTENT_MARKETING, "", 2)
    ]
    empty = await router_stub.GetQueueStats(router_pb2.GetQueueStatsRequest(campaign_id="none"))
    assert (empty.due, len(empty.counts), empty.oldest_due_age.seconds) == (0, 0, 0)


async def test_list_providers_reports_degraded_health(
    router_stub: router_pb2_grpc.RouterServiceStub,
) -> None:
    response = await router_stub.ListProviders(router_pb2.ListProvidersRequest())
    by_name = {p.name: p for p in response.providers}
    assert by_name["dear"].health == router_pb2.PROVIDER_HEALTH_DEGRADED
    assert by_name["dear"].success_rate == pytest.approx(0.1)
    assert by_name["cheap"].health == router_pb2.PROVIDER_HEALTH_HEALTHY
    assert by_name["off"].health == router_pb2.PROVIDER_HEALTH_DISABLED
