"""Circuits, outage clocks and probes shared by routers through real Redis, with two
dispatchers on one PostgreSQL queue and a scripted sender over real gRPC; and what a router
does when Redis stops answering."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, cast

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.common.metrics import Metrics
from sluice.common.telemetry import disabled
from sluice.router.circuit import CircuitConfig, CircuitState
from sluice.router.dispatch import Dispatcher
from sluice.router.health import ProviderHealthTracker
from sluice.router.metrics import RouterMetrics
from sluice.router.outcomes import SENDER_TARGET
from sluice.router.provider_state import OutageClock
from sluice.router.shared_state import SharedState, target_key
from sluice.v1 import sender_pb2_grpc
from tests.conftest import REDIS_URL
from tests.e2e.test_e2e_crashes import REDIS_SERVER, redis_server
from tests.router.router_fakes import PROVIDERS, FakeSender, rows, seed
from tests.router.test_router_dispatch import base_settings

CIRCUIT = {
    "circuit_min_samples": 10,
    "circuit_cooldown_seconds": 0.5,
    # far longer than the test: a second probe within it could only be a doubled probe
    "circuit_probe_seconds": 60.0,
    "max_attempts": 20,
    "router_batch_size": 6,
}


def router(
    pg_dsn: str,
    pool: asyncpg.Pool,
    sender_channel: grpc.aio.Channel,
    redis: Any,
    prefix: str,
    seed_: int,
    **overrides: Any,
) -> Dispatcher:
    return Dispatcher(
        base_settings(pg_dsn, redis_prefix=prefix, **overrides),
        pool,
        cast(Any, sender_pb2_grpc.SenderServiceStub(sender_channel)),
        PROVIDERS,
        disabled(),
        rng=random.Random(seed_),
        redis=redis,
    )


def shared(d: Dispatcher) -> SharedState:
    assert d.state.shared is not None
    return d.state.shared


def opened(*routers: Dispatcher) -> Counter[str]:
    """Circuit openings counted by the routers' syncs, per circuit ('' the provider's)."""
    out: Counter[str] = Counter()
    for r in routers:
        for (provider, kind, state), n in shared(r).transitions.items():
            if state == "open":
                out[f"{provider}/{kind}"] += n
    return out


async def make_due(pool: asyncpg.Pool) -> None:
    await pool.execute("UPDATE intents SET due_at = now() WHERE status = 'pending'")


async def eventually(check: Any, what: str, within: float = 30.0) -> None:
    """Awaits ``check()`` every 50 ms until it is true (a generous bound, not a timing)."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


async def test_two_routers_open_a_circuit_once_and_probe_it_once(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    template: str,
    fake: FakeSender,
    sender_channel: grpc.aio.Channel,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    fake.fail_providers = {"cheap"}  # every send to cheap: "cheap answered 503"
    a, b = (
        router(pg_dsn, pg_pool, sender_channel, redis_client, redis_prefix, n, **CIRCUIT)
        for n in (1, 2)
    )
    await seed(pg_pool, [f"ok{i}@example.com" for i in range(12)])
    # Each router sends 6 messages to cheap: neither reaches the 10 samples a circuit needs
    # on its own, together they do.
    assert (await a.run_round()).leased == 6
    assert (await b.run_round()).leased == 6
    assert {c.provider for c in fake.calls} == {"cheap"}
    for r in (a, b, a):
        await r.state.view(["marketing"])  # the next rounds' syncs, without a lease
    assert a.state.circuits.state("cheap") is CircuitState.CLOSED  # alone: not enough
    assert b.state.circuits.state("cheap") is CircuitState.CLOSED
    for r in (a, b):
        assert r.state.circuit("cheap") is CircuitState.OPEN
        assert r.state.circuit("cheap", "marketing") is CircuitState.OPEN
    assert opened(a, b) == {"cheap/": 1, "cheap/marketing": 1}  # once, for both

    # Both route around it.
    fake.calls.clear()
    await make_due(pg_pool)
    for r in (a, b):
        assert (await r.run_round()).sent == 6
    assert {c.provider for c in fake.calls} == {"dear"}

    # After the cool-down one probe goes through, from one router only, however many
    # rounds both run; the probe fails (cheap still answers 503) and the circuit opens again.
    await seed(pg_pool, [f"ok-p{i}@example.com" for i in range(24)])
    fake.calls.clear()
    for r in (a, b):
        await r.state.view(())

    async def half_open() -> bool:
        await a.state.view(())  # no kinds: reads without taking a probe
        return a.state.circuit("cheap") is CircuitState.HALF_OPEN

    await eventually(half_open, "the cool-down ended")
    for r in (a, b, a, b):
        await r.run_round()
    assert Counter(c.provider for c in fake.calls)["cheap"] == 1, fake.calls
    for r in (a, b):
        await r.state.view(["marketing"])
    assert a.state.circuit("cheap") is CircuitState.OPEN
    assert opened(a, b) == {"cheap/": 2, "cheap/marketing": 2}


async def test_two_routers_share_an_outage_and_probe_it_once(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    template: str,
    fake: FakeSender,
    sender_channel: grpc.aio.Channel,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    fake.abort, fake.capacity_down = grpc.StatusCode.UNAVAILABLE, True
    settings = {"outage_probe_seconds": 2.0, "outage_hold_max_seconds": 600.0}
    a, b = (
        router(pg_dsn, pg_pool, sender_channel, redis_client, redis_prefix, n, **settings)
        for n in (1, 2)
    )
    ids = await seed(pg_pool, [f"ok{i}@example.com" for i in range(4)])
    await a.run_round()
    # b has sent nothing, yet knows the sender is down: from a, through Redis.
    await b.state.view(["marketing"])
    assert b.state.is_down(SENDER_TARGET)
    assert await redis_client.hexists(target_key(redis_prefix, SENDER_TARGET), "out:since")
    # One probe per interval for both routers, not one each.
    assert await a.probe_once() == []
    assert await b.probe_once() == []
    assert fake.probes == 1
    # The sender is back: the next probe (b's, once the interval is over) releases what a
    # held, and a has nothing left to release.
    fake.abort, fake.capacity_down = None, False

    async def b_probed() -> bool:
        return bool(await b.probe_once())

    await eventually(b_probed, "b probed the sender again")
    assert await a.probe_once() == []
    assert (a.stats.outage_released, b.stats.outage_released) == (0, 4)
    stored = await rows(pg_pool, ids)
    assert all(r["due_at"] <= r["now"] for r in stored.values())
    assert not a.state.is_down(SENDER_TARGET)


async def test_routers_plan_with_their_share_of_each_provider(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    template: str,
    sender_channel: grpc.aio.Channel,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    routers = [
        router(pg_dsn, pg_pool, sender_channel, redis_client, redis_prefix, n) for n in range(3)
    ]
    shares = [(await r.state.view(["marketing"])).share for r in routers]
    assert shares[-1] == pytest.approx(1 / 3)  # the third has heard of all three
    assert (await routers[0].state.view(["marketing"])).share == pytest.approx(1 / 3)


@pytest.mark.skipif(REDIS_SERVER is None, reason="needs a redis-server binary")
async def test_redis_down_falls_back_to_local_state_says_so_and_comes_back(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    template: str,
    fake: FakeSender,
    sender_channel: grpc.aio.Channel,
    redis_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sluice.router.shared_state")
    async with redis_server(tmp_path / "redis.log") as server:
        client = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.2)
        settings = {**CIRCUIT, "router_batch_size": 100}
        d = router(pg_dsn, pg_pool, sender_channel, client, redis_prefix, 1, **settings)
        metrics = Metrics("router")
        RouterMetrics(metrics, PROVIDERS, ProviderHealthTracker(PROVIDERS)).watch_shared_state(
            shared(d)
        )
        await seed(pg_pool, ["ok0@example.com"])
        assert (await d.run_round()).sent == 1
        assert shared(d).active

        await server.kill()
        fake.fail_providers = {"cheap"}
        ids = await seed(pg_pool, [f"ok{i}@example.com" for i in range(1, 21)])
        # Routing goes on, on this router's own circuits: cheap fails, its circuit opens
        # locally, and the retries go to dear.
        await d.run_round()
        assert not shared(d).active
        assert d.state.circuit("cheap") is CircuitState.OPEN
        await make_due(pg_pool)
        assert (await d.run_round()).sent == 20
        assert {r["provider"] for r in (await rows(pg_pool, ids)).values()} == {"dear"}
        assert any("Redis did not answer" in r.getMessage() for r in caplog.records)
        assert metrics.registry.get_sample_value("sluice_router_shared_state_local") == 1.0
        failures = metrics.registry.get_sample_value("sluice_router_shared_state_failures_total")
        assert failures is not None
        assert failures >= 1

        await server.start()

        async def shared_again() -> bool:
            await d.state.view(["marketing"])
            return shared(d).active

        await eventually(shared_again, "Redis used again")
        assert any("Redis answers again" in r.getMessage() for r in caplog.records)
        assert metrics.registry.get_sample_value("sluice_router_shared_state_local") == 0.0
        await client.aclose()


# ---- the shared circuit against a model -------------------------------------------------

# (router, good, failed, batches, seconds per batch) of one sync
flushes_st = st.lists(
    st.tuples(
        st.sampled_from([0, 1]),
        st.integers(0, 30),
        st.integers(0, 3),
        st.integers(1, 3),
        st.sampled_from([0.01, 0.01, 0.2]),
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=60, deadline=None)
@given(flushes=flushes_st)
def test_a_shared_circuit_opens_once_exactly_when_the_combined_samples_breach(
    flushes: list[tuple[int, int, int, int, float]],
) -> None:
    """Two routers' samples, synced in any interleaving, open the circuit at the first sync
    where their sum breaches the rate or latency bound, once, and nothing reopens it while
    it cools down; a model of the rule over the combined counts says when."""
    asyncio.run(_check_circuit(flushes))


async def _check_circuit(flushes: list[tuple[int, int, int, int, float]]) -> None:
    redis = aioredis.Redis.from_url(REDIS_URL)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    config = CircuitConfig(min_samples=20, max_latency=0.1, cooldown=600.0)
    routers = [
        SharedState(
            redis,
            prefix,
            {"p": ("marketing",)},
            [],
            config,
            probe_interval=0.5,
            hold_max=30.0,
            router_id=f"r{n}",
            outages=OutageClock(probe_interval=0.5, hold_max=30.0, rng=random.Random(n)),
            # The combined arithmetic is under test, not the fallback: a loaded CI box once
            # took longer than the routers' 0.25 s for one of these round trips.
            redis_timeout=10.0,
        )
        for n in range(2)
    ]
    good = total = batches = latency_ms = 0
    is_open = False
    try:
        for who, ok, failed, count, seconds in flushes:
            for _ in range(count):
                routers[who].record("p", "marketing", ok=ok, failed=failed, seconds=seconds)
            view = await routers[who].sync(["marketing"])
            assert view is not None
            if not is_open and ok + failed > 0:
                good += ok * count
                total += (ok + failed) * count
                batches += count
                latency_ms += int(seconds * 1000) * count
                is_open = total >= config.min_samples and (
                    good / total < config.threshold or latency_ms / batches > 100
                )
            assert (("p", "") in view.closed) is is_open
            assert (("p", "marketing") in view.closed) is is_open
        opened = sum(
            n for r in routers for (_, kind, to), n in r.transitions.items() if to == "open"
        )
        assert opened == (2 if is_open else 0)  # the provider's circuit and marketing's
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
