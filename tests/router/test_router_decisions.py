"""The routing decision a dispatcher records, read back through GetIntent over real gRPC, and
a provider closed to one kind (paused for it, guard-tripped for bulk, or its circuit for that
kind open) staying a candidate for the others, in the same lease."""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import grpc
import pytest

from sluice.common.providers import ProviderConfig
from sluice.common.telemetry import disabled
from sluice.ingest import app as ingest_app
from sluice.ingest.settings import IngestSettings
from sluice.router import controls
from sluice.router.dispatch import Dispatcher
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, sender_pb2_grpc
from tests.router.router_fakes import PROVIDERS, FakeSender, rows, seed
from tests.router.test_router_dispatch import base_settings


@pytest.fixture
async def ingest(pg_dsn: str) -> AsyncIterator[ingest_pb2_grpc.IngestServiceStub]:
    settings = IngestSettings(database_url=pg_dsn, db_pool_size=2, ingest_max_loop_lag_seconds=0)
    async with (
        ingest_app.running(settings, disabled(), port=0) as handle,
        grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as ch,
    ):
        yield ingest_pb2_grpc.IngestServiceStub(ch)


def dispatcher(
    pg_dsn: str,
    pool: asyncpg.Pool,
    sender_channel: grpc.aio.Channel,
    providers: tuple[ProviderConfig, ...] = PROVIDERS,
    **overrides: Any,
) -> Dispatcher:
    return Dispatcher(
        base_settings(pg_dsn, **overrides),
        pool,
        cast(Any, sender_pb2_grpc.SenderServiceStub(sender_channel)),
        providers,
        disabled(),
        rng=random.Random(3),
    )


async def get(stub: ingest_pb2_grpc.IngestServiceStub, intent_id: uuid.UUID) -> Any:
    return (await stub.GetIntent(ingest_pb2.GetIntentRequest(id=str(intent_id)))).intent


async def test_get_intent_shows_the_policys_reason_and_what_it_cost(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    template: str,
    fake: FakeSender,
    sender_channel: grpc.aio.Channel,
    ingest: ingest_pb2_grpc.IngestServiceStub,
) -> None:
    d = dispatcher(pg_dsn, pg_pool, sender_channel, circuit_min_samples=5, max_attempts=10)
    (first,) = await seed(pg_pool, ["ok@example.com"])
    await d.run_round()
    shown = await get(ingest, first)
    assert (shown.provider, shown.route_reason) == (
        "cheap",
        "cheap: cheapest that meets the deadline",
    )
    assert shown.route_cost == pytest.approx(0.0001)

    # cheap fails: its circuit opens, and the retries say why they went to dear.
    fake.fail_providers = {"cheap"}
    later = await seed(pg_pool, [f"ok{i}@example.com" for i in range(5)])
    await d.run_round()
    await pg_pool.execute("UPDATE intents SET due_at = now() WHERE status = 'pending'")
    assert (await d.run_round()).sent == 5
    shown = await get(ingest, later[0])
    assert shown.provider == "dear"
    assert shown.route_reason == (
        "dear: cheapest that meets the deadline (passed over: cheap circuit open for marketing)"
    )
    assert shown.route_cost == pytest.approx(0.0003)


BOTH = frozenset({"marketing", "transactional"})
SHARED_PATHS = (
    dataclasses.replace(PROVIDERS[0], intents=BOTH | {"digest"}),  # cheap
    dataclasses.replace(PROVIDERS[1], intents=BOTH),  # dear
)


async def close_by_pause(pool: asyncpg.Pool, d: Dispatcher, fake: FakeSender) -> None:
    await controls.pause(pool, "cheap", "marketing", "test")


async def close_by_guard(pool: asyncpg.Pool, d: Dispatcher, fake: FakeSender) -> None:
    await pool.execute(
        "INSERT INTO provider_guards (provider, guard, tripped, rate, threshold, events,"
        " volume, window_seconds, tripped_at, blocked_kinds)"
        " VALUES ('cheap', 'bounce_rate', true, 0.1, 0.05, 10, 100, 86400, now(),"
        " '{marketing,digest}')"
    )


async def close_by_circuit(pool: asyncpg.Pool, d: Dispatcher, fake: FakeSender) -> None:
    # Marketing to cheap fails, transactional succeeds: cheap's marketing circuit opens, its
    # provider-wide one stays closed (100 of 110 good) and cheap stays healthy (over 90 %).
    await seed(pool, [f"ok-t{i}@example.com" for i in range(100)], kind="transactional")
    await d.run_round()
    await seed(pool, [f"transient{i}@example.com" for i in range(10)])
    await d.run_round()
    assert d.state.circuits.open_providers("marketing") == {"cheap"}
    assert d.state.circuits.open_providers("transactional") == set()


@pytest.mark.parametrize("close", [close_by_pause, close_by_guard, close_by_circuit])
async def test_a_provider_closed_to_marketing_stays_a_candidate_for_transactional(
    close: Any,
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    template: str,
    fake: FakeSender,
    sender_channel: grpc.aio.Channel,
) -> None:
    d = dispatcher(
        pg_dsn,
        pg_pool,
        sender_channel,
        SHARED_PATHS,
        circuit_min_samples=10,
        circuit_success_threshold=0.5,
        router_batch_size=200,
        max_attempts=1,
    )
    await close(pg_pool, d, fake)
    marketing = await seed(pg_pool, ["ok-m@example.com"])
    transactional = await seed(pg_pool, ["ok-t@example.com"], kind="transactional")
    fake.calls.clear()
    await d.run_round()  # one lease holds both
    stored = await rows(pg_pool, marketing + transactional)
    assert stored[marketing[0]]["provider"] == "dear"
    assert stored[transactional[0]]["provider"] == "cheap"
    assert {r["status"] for r in stored.values()} == {"sent"}
