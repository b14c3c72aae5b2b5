"""Operators' controls over real gRPC against real PostgreSQL: pause and resume (manual
failover), re-queueing failed intents (replay), and the richer stats."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2

from sluice.common.grpcserver import GrpcListener
from sluice.common.telemetry import disabled
from sluice.router.app import SERVICE_NAME
from sluice.router.dispatch import Dispatcher
from sluice.router.service import RouterServicer
from sluice.v1 import intent_pb2, router_pb2, router_pb2_grpc, sender_pb2_grpc
from tests.grpc_helpers import field_violations
from tests.router.router_fakes import PROVIDERS, FakeSender, rows, seed, serve_fake
from tests.router.test_router_dispatch import base_settings


@pytest.fixture
async def dispatcher(
    pg_dsn: str, pg_pool: asyncpg.Pool, fake: FakeSender
) -> AsyncIterator[Dispatcher]:
    async for port in serve_fake(fake):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Dispatcher(
                base_settings(pg_dsn),
                pg_pool,
                cast(Any, sender_pb2_grpc.SenderServiceStub(channel)),
                PROVIDERS,
                disabled(),
                rng=random.Random(3),
            )


@pytest.fixture
async def stub(
    pg_pool: asyncpg.Pool, dispatcher: Dispatcher
) -> AsyncIterator[router_pb2_grpc.RouterServiceStub]:
    handle = GrpcListener("127.0.0.1", 0, service_names=[SERVICE_NAME])
    router_pb2_grpc.add_RouterServiceServicer_to_server(
        RouterServicer(pg_pool, PROVIDERS, dispatcher.health, dispatcher.state, dispatcher.book),
        handle.server,
    )
    port = await handle.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield router_pb2_grpc.RouterServiceStub(channel)
    finally:
        await handle.stop(0)


async def test_pause_moves_traffic_to_the_next_provider_and_resume_brings_it_back(
    pg_pool: asyncpg.Pool,
    template: str,
    fake: FakeSender,
    dispatcher: Dispatcher,
    stub: router_pb2_grpc.RouterServiceStub,
) -> None:
    paused = await stub.PauseProvider(
        router_pb2.PauseProviderRequest(provider="cheap", reason="DNS migration")
    )
    assert paused.provider.paused
    first = await seed(pg_pool, [f"ok{i}@example.com" for i in range(3)])
    digest = await seed(pg_pool, ["ok-d@example.com"], kind="digest")  # only cheap serves it
    await dispatcher.run_round()
    stored = await rows(pg_pool, first + digest)
    assert {stored[i]["provider"] for i in first} == {"dear"}
    assert {stored[i]["status"] for i in first} == {"sent"}
    # Its only provider is paused: it waits, it does not fail.
    assert stored[digest[0]]["status"] == "pending"
    assert "no usable provider for digest" in stored[digest[0]]["last_error"]
    resumed = await stub.ResumeProvider(router_pb2.ResumeProviderRequest(provider="cheap"))
    assert not resumed.provider.paused
    assert resumed.released == 1  # the waiting digest intent is due at once
    await dispatcher.run_round()
    stored = await rows(pg_pool, digest)
    assert (stored[digest[0]]["status"], stored[digest[0]]["provider"]) == ("sent", "cheap")


async def test_pause_for_one_intent_only(
    pg_pool: asyncpg.Pool,
    template: str,
    dispatcher: Dispatcher,
    stub: router_pb2_grpc.RouterServiceStub,
) -> None:
    answer = await stub.PauseProvider(
        router_pb2.PauseProviderRequest(provider="cheap", intent=intent_pb2.INTENT_MARKETING)
    )
    assert not answer.provider.paused
    assert list(answer.provider.paused_intents) == [intent_pb2.INTENT_MARKETING]
    marketing = await seed(pg_pool, ["ok@example.com"])
    digest = await seed(pg_pool, ["ok-d@example.com"], kind="digest")
    await dispatcher.run_round()
    stored = await rows(pg_pool, marketing + digest)
    assert stored[marketing[0]]["provider"] == "dear"
    assert stored[digest[0]]["provider"] == "cheap"


async def test_pause_rejects_unknown_providers_and_intents_it_does_not_serve(
    stub: router_pb2_grpc.RouterServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.PauseProvider(router_pb2.PauseProviderRequest(provider="nope"))
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as unserved:
        await stub.PauseProvider(
            router_pb2.PauseProviderRequest(provider="dear", intent=intent_pb2.INTENT_DIGEST)
        )
    assert unserved.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_retry_failed_requeues_by_filter_once_per_request_id_and_can_force_a_provider(
    pg_pool: asyncpg.Pool,
    template: str,
    fake: FakeSender,
    dispatcher: Dispatcher,
    stub: router_pb2_grpc.RouterServiceStub,
) -> None:
    spring = await seed(pg_pool, ["permanent1@example.com", "permanent2@example.com"])
    autumn = await seed(pg_pool, ["permanent3@example.com"], campaign_id="autumn")
    await dispatcher.run_round()
    assert {r["status"] for r in (await rows(pg_pool, spring + autumn)).values()} == {"failed"}
    # The mailbox problem is fixed; replay spring's failures through "dear".
    await pg_pool.execute("UPDATE intents SET recipient = replace(recipient, 'permanent', 'ok')")
    request = router_pb2.RetryFailedRequest(
        request_id="replay-1",
        campaign_id="spring",
        error_contains="MAILBOX",
        provider="dear",
        deadline_extension=duration_pb2.Duration(seconds=7200),
    )
    first = await stub.RetryFailed(request)
    again = await stub.RetryFailed(request)
    assert (first.requeued, first.replayed) == (2, False)
    assert (again.requeued, again.replayed) == (2, True)
    stored = await rows(pg_pool, spring + autumn)
    assert {stored[i]["status"] for i in spring} == {"pending"}
    assert {stored[i]["attempts"] for i in spring} == {0}
    assert stored[autumn[0]]["status"] == "failed"
    fake.calls.clear()
    await dispatcher.run_round()
    stored = await rows(pg_pool, spring)
    assert {(r["status"], r["provider"]) for r in stored.values()} == {("sent", "dear")}
    assert {c.provider for c in fake.calls} == {"dear"}  # forced, though cheap is cheaper
    reasons = await pg_pool.fetch("SELECT route_reason FROM intents WHERE id = ANY($1)", spring)
    assert {r["route_reason"] for r in reasons} == {"dear: forced by RetryFailed"}


async def test_retry_failed_validates_its_request(
    stub: router_pb2_grpc.RouterServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RetryFailed(router_pb2.RetryFailedRequest(provider="nope", limit=-1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(info.value)) == {"request_id", "provider", "limit"}


async def test_stats_show_backlog_cost_circuits_and_held_intents(
    pg_pool: asyncpg.Pool,
    template: str,
    fake: FakeSender,
    dispatcher: Dispatcher,
    stub: router_pb2_grpc.RouterServiceStub,
) -> None:
    await seed(pg_pool, [f"ok{i}@example.com" for i in range(4)])
    await seed(pg_pool, ["ok-t@example.com"], kind="transactional")  # only "off" serves it
    await dispatcher.run_round()
    stats = await stub.GetQueueStats(router_pb2.GetQueueStatsRequest())
    (cheap,) = [b for b in stats.providers if b.provider == "cheap"]
    assert (cheap.sent, cheap.planned) == (4, 0)
    assert cheap.cost == pytest.approx(4 * 0.10 / 1000)
    assert dict(stats.held) == {"kind:transactional": 1}
    providers = {
        p.name: p for p in (await stub.ListProviders(router_pb2.ListProvidersRequest())).providers
    }
    assert providers["cheap"].circuit == router_pb2.CIRCUIT_STATE_CLOSED
    assert providers["cheap"].cost_so_far == pytest.approx(0.0004)
    assert providers["cheap"].reachable


async def test_a_tripped_deliverability_guard_moves_marketing_off_the_provider(
    pg_pool: asyncpg.Pool, template: str, dispatcher: Dispatcher
) -> None:
    # What ingest writes when cheap's complaint rate crosses its threshold (webhooks/guards).
    await pg_pool.execute(
        "INSERT INTO provider_guards (provider, guard, tripped, rate, threshold, events,"
        " volume, window_seconds, tripped_at)"
        " VALUES ('cheap', 'complaint_rate', true, 0.01, 0.001, 10, 1000, 86400, now())"
    )
    marketing = await seed(pg_pool, ["ok-m@example.com"])
    await dispatcher.run_round()
    stored = await rows(pg_pool, marketing)
    assert stored[marketing[0]]["provider"] == "dear"  # cheap's marketing is blocked
    pauses = dispatcher.book.pauses
    assert ("cheap", "marketing") in pauses
    assert ("cheap", "digest") in pauses
    assert ("cheap", "transactional") not in pauses  # a guard never blocks transactional
    # The guard clears: marketing goes back to the cheapest provider.
    await pg_pool.execute("UPDATE provider_guards SET tripped = false")
    await dispatcher.book.refresh_pauses(force=True)
    again = await seed(pg_pool, ["ok-m2@example.com"])
    await dispatcher.run_round()
    assert (await rows(pg_pool, again))[again[0]]["provider"] == "cheap"


async def test_bulk_mail_carries_a_signed_one_click_unsubscribe_link(
    pg_dsn: str, pg_pool: asyncpg.Pool, template: str, fake: FakeSender
) -> None:
    from sluice.common.unsubscribe import read_token

    secret = "s3cret-for-links"
    async for port in serve_fake(fake):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            dispatcher = Dispatcher(
                base_settings(
                    pg_dsn,
                    unsubscribe_base_url="https://mail.example.com/",
                    unsubscribe_secret=secret,
                ),
                pg_pool,
                cast(Any, sender_pb2_grpc.SenderServiceStub(channel)),
                PROVIDERS,
                disabled(),
                rng=random.Random(5),
            )
            marketing = await seed(pg_pool, ["ok-m@example.com"])
            await dispatcher.run_round()
    (message,) = [m for m in fake.sent() if m.intent_id == str(marketing[0])]
    prefix = "https://mail.example.com/unsubscribe/"
    assert message.list_unsubscribe_url.startswith(prefix)
    token = message.list_unsubscribe_url.removeprefix(prefix)
    # The link names exactly this intent, and only our secret makes it.
    assert read_token(secret.encode(), token) == marketing[0]
    with pytest.raises(ValueError, match="signature"):
        read_token(b"another secret", token)
