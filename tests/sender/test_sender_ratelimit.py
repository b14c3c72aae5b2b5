"""RateLimiter against real Redis: exact grants and retry-after, and, with a simulated clock,
the properties promise 4 rests on (burst window, sustained bound, near-full use)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sluice.common.errors import Unavailable
from sluice.common.providers import ProviderConfig
from sluice.sender.ratelimit import Capacity, Grant, RateLimiter, even_requests, rate_limit_keys

REDIS_URL = os.environ.get("SLUICE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BASE_US = 1_700_000_000_000_000
WINDOW_US = 1_050_000  # 1 s + the default 50 ms guard
WORKER = Path(__file__).with_name("_rl_worker.py")


def provider(rate: float, burst: int, name: str | None = None) -> ProviderConfig:
    return ProviderConfig(
        name=name or f"p{uuid.uuid4().hex[:8]}",
        kind="sandbox",
        cost_per_thousand=0.1,
        sustained_rate=rate,
        burst=burst,
        intents=frozenset({"marketing"}),
    )


def bucket_capacity(rate: float, burst: int) -> float:
    return max(float(burst) if burst > 0 else rate, 1.0)


def max_window_sum(events: list[tuple[int, int]], width_us: int) -> int:
    """Largest total granted within any half-open interval [t, t + width) of the events."""
    events = sorted(events)
    best = total = start = 0
    for t, n in events:
        total += n
        while events[start][0] <= t - width_us:
            total -= events[start][1]
            start += 1
        best = max(best, total)
    return best


def bucket_deficit(events: list[tuple[int, int]], capacity: float, rate: float) -> float:
    """Replays the grants through an exact token bucket that starts full; returns the lowest
    token level reached. Negative means some interval [a, b] got more than
    capacity + rate * (b - a): the sustained limit was broken."""
    tokens = capacity
    lowest = capacity
    last = None
    for t, n in sorted(events):
        if last is not None:
            tokens = min(capacity, tokens + rate * (t - last) / 1e6)
        last = t
        tokens -= n
        lowest = min(lowest, tokens)
    return lowest


@pytest.fixture
def limiter(redis_client: aioredis.Redis, redis_prefix: str) -> RateLimiter:
    return RateLimiter(redis_client, redis_prefix)


def test_window_helpers_detect_violations() -> None:
    # The checkers below must be able to fail, or the property tests prove nothing.
    assert max_window_sum([(0, 5), (WINDOW_US - 1, 5)], WINDOW_US) == 10
    assert max_window_sum([(0, 5), (WINDOW_US, 5)], WINDOW_US) == 5
    assert bucket_deficit([(0, 10), (100_000, 2)], 10, 10) == pytest.approx(-1)
    assert bucket_deficit([(0, 10), (200_000, 2)], 10, 10) == pytest.approx(0)


async def test_grants_within_limits_then_partial_with_retry(limiter: RateLimiter) -> None:
    p = provider(14, 30)
    first = await limiter.acquire(p, [20])
    assert first == Grant(granted=20, retry_after=0.0, at_us=first.at_us, requests=1)
    assert first.at_us > 0
    second = await limiter.acquire(p, [20])
    assert second.granted == 10
    # The window is full: room comes back when the first grant leaves it.
    expected = (first.at_us + WINDOW_US - second.at_us) / 1e6
    assert second.retry_after == pytest.approx(expected, abs=1e-6)
    third = await limiter.acquire(p, [1])
    assert third.granted == 0
    assert 0 < third.retry_after <= second.retry_after


async def test_retry_after_math_with_simulated_clock(limiter: RateLimiter) -> None:
    # Sustained only: capacity = rate = 10; the bucket wait is (1 - tokens) / rate, + 1 µs.
    p = provider(10, 0)
    assert (await limiter.acquire(p, [15], now_us=BASE_US)).granted == 10
    g = await limiter.acquire(p, [1], now_us=BASE_US + 40_000)  # 0.4 tokens
    assert g.granted == 0
    assert g.retry_after == pytest.approx(0.060001, abs=1e-6)
    assert (await limiter.acquire(p, [1], now_us=BASE_US + 40_000 + 59_000)).granted == 0
    assert (await limiter.acquire(p, [1], now_us=BASE_US + 100_001)).granted == 1

    # Burst only: the window wait is oldest grant + window - now.
    q = provider(0, 5)
    g = await limiter.acquire(q, [7], now_us=BASE_US)
    assert g.granted == 5
    assert g.retry_after == pytest.approx(1.05)
    assert (await limiter.acquire(q, [1], now_us=BASE_US + WINDOW_US - 1)).granted == 0
    assert (await limiter.acquire(q, [9], now_us=BASE_US + WINDOW_US)).granted == 5

    # Both: the longer wait wins.
    r = provider(4, 8)
    assert (await limiter.acquire(r, [8], now_us=BASE_US)).granted == 8
    g = await limiter.acquire(r, [1], now_us=BASE_US + 300_000)  # bucket has 1.2, window full
    assert g.granted == 0
    assert g.retry_after == pytest.approx(0.75)


async def test_capacity_reads_without_consuming(limiter: RateLimiter) -> None:
    p = provider(10, 20)
    fresh = await limiter.capacity(p, now_us=BASE_US)
    assert fresh == Capacity(20.0, 10.0, 20, 20, unlimited=False)
    assert fresh.available == 20
    await limiter.acquire(p, [15], now_us=BASE_US)
    for _ in range(3):
        cap = await limiter.capacity(p, now_us=BASE_US + 100_000)
        assert cap.sustained_tokens == pytest.approx(6.0)
        assert cap.burst_available == 5
        assert cap.available == 5
    # After the window passes, peek sees the grant gone even though it did not prune it.
    later = await limiter.capacity(p, now_us=BASE_US + WINDOW_US)
    assert later.burst_available == 20
    assert (await limiter.acquire(p, [6], now_us=BASE_US + 100_000)).granted == 5


async def test_unlimited_provider_never_touches_redis(
    limiter: RateLimiter, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    p = provider(0, 0)
    grant = await limiter.acquire(p, even_requests(10_000, 100))
    assert grant == Grant(granted=10_000, retry_after=0.0, requests=100)
    cap = await limiter.capacity(p)
    assert cap.unlimited
    assert cap.available is None
    assert [k async for k in redis_client.scan_iter(match=f"{redis_prefix}:*")] == []


async def test_keys_are_hash_tagged_and_expire(
    limiter: RateLimiter, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    p = provider(10, 20, name="ses")
    await limiter.acquire(p, [5])
    keys = rate_limit_keys(redis_prefix, "ses")
    assert keys[:2] == [f"{redis_prefix}:rl:{{ses}}:sustained", f"{redis_prefix}:rl:{{ses}}:burst"]
    assert all(k.startswith(f"{redis_prefix}:rl:{{ses}}:") for k in keys)
    # Only the message limits are configured: request and quota keys are never written.
    for key in keys[3:]:
        assert await redis_client.exists(key) == 0, key
    for key in keys[:3]:
        ttl = await redis_client.pttl(key)
        # Bucket: refill 5 tokens at 10/s = 500 ms; window: 1050 ms; plus 1 s of slack.
        assert 0 < ttl <= 2_050, (key, ttl)


async def test_redis_down_raises_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = aioredis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(Unavailable, match="rate limiter"):
            await RateLimiter(client, "down").acquire(provider(10, 20), [1])
    finally:
        await client.aclose()


async def test_rejects_empty_requests(limiter: RateLimiter) -> None:
    for size in (-1, 0):
        with pytest.raises(ValueError, match="at least one message"):
            await limiter.acquire(provider(10, 20), [5, size])
    assert await limiter.acquire(provider(10, 20), []) == Grant(0, 0.0)


@st.composite
def limits(draw: st.DrawFn) -> tuple[float, int]:
    """(sustained_rate, burst) as ProviderConfig allows them: rate <= burst, not both off."""
    kind = draw(st.sampled_from(["both", "both", "sustained", "burst"]))
    if kind == "burst":
        return 0.0, draw(st.integers(1, 60))
    rate = draw(st.floats(0.5, 40, allow_nan=False).map(lambda r: round(r, 3)))
    if kind == "sustained":
        return rate, 0
    return rate, draw(st.integers(max(1, math.ceil(rate)), 80))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lim=limits(),
    # None advances exactly by the last retry_after, the path a throttled client takes.
    steps=st.lists(
        st.tuples(st.none() | st.integers(0, 400_000), st.integers(1, 40)), min_size=1, max_size=120
    ),
)
async def test_simulated_clock_never_exceeds_limits(
    limiter: RateLimiter, lim: tuple[float, int], steps: list[tuple[int | None, int]]
) -> None:
    rate, burst = lim
    p = provider(rate, burst)
    now = BASE_US
    retry_us = 0
    events: list[tuple[int, int]] = []
    for advance, n in steps:
        waited = retry_us if advance is None else advance
        now += waited
        g = await limiter.acquire(p, [n], now_us=now)
        assert g.at_us == now
        assert 0 <= g.granted <= n
        if retry_us and waited >= retry_us:
            assert g.granted >= 1, "retry_after promised room that was not there"
        if g.granted < n:
            assert g.retry_after > 0
            retry_us = round(g.retry_after * 1e6)
        else:
            assert g.retry_after == 0
            retry_us = 0
        if g.granted:
            events.append((now, g.granted))
    if burst:
        assert max_window_sum(events, WINDOW_US) <= burst
    if rate:
        assert bucket_deficit(events, bucket_capacity(rate, burst), rate) >= -1e-6


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lim=limits(), demand=st.integers(1, 50), idle_us=st.integers(0, 20_000))
async def test_constant_demand_uses_nearly_all_capacity(
    limiter: RateLimiter, lim: tuple[float, int], demand: int, idle_us: int
) -> None:
    rate, burst = lim
    p = provider(rate, burst)
    horizon_us = 20_000_000
    now = BASE_US
    late = 0  # granted in the second half: the long-run rate, past the initial full bucket
    while now < BASE_US + horizon_us:
        g = await limiter.acquire(p, [demand], now_us=now)
        assert g.granted == demand or g.retry_after > 0, "throttled with no retry-after"
        if now >= BASE_US + horizon_us // 2:
            late += g.granted
        # A backlogged client comes back when told to, or after a short idle when satisfied.
        now += round(g.retry_after * 1e6) if g.granted < demand else idle_us
    limit_rates = []
    if rate:
        limit_rates.append(rate)
    if burst:
        # The guard makes the window 1.05 s, so burst alone allows burst / 1.05 per second.
        limit_rates.append(burst / (WINDOW_US / 1e6))
    effective = min(limit_rates)
    # Demand itself may be lower than the limits when the client idles between full grants.
    if idle_us:
        effective = min(effective, demand / (idle_us / 1e6))
    achieved = late / (horizon_us / 2 / 1e6)
    assert achieved >= 0.95 * effective - 1 / (horizon_us / 2 / 1e6), (achieved, effective)


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_sluice_rl_worker", WORKER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
async def test_processes_and_tasks_together_hold_the_limits(redis_prefix: str) -> None:
    """Two extra processes and this one, 20 tasks each, hammer one provider for 2.5 s of
    real time; grant times come from Redis TIME, so the windows are checked on one clock."""
    rate, burst, duration = 100.0, 120, 2.5
    p = provider(rate, burst)
    argv = [REDIS_URL, redis_prefix, p.name, str(rate), str(burst), "20"]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        # Start together only once every worker has imported and connected, however slow.
        for proc in procs:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
        start_at = time.time() + 0.05
        end_at = start_at + duration
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{start_at} {end_at}\n".encode())
            await proc.stdin.drain()
        local = await _load_worker().run(REDIS_URL, redis_prefix, p, 20, start_at, end_at)
        events = [(t, n) for t, n in local]
        for proc in procs:
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0
            remote = json.loads(out)
            assert remote, "a worker process got no grants"
            events += [(t, n) for t, n in remote]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    assert max_window_sum(events, WINDOW_US) <= burst
    assert max_window_sum(events, 1_000_000) <= burst  # the promise as the provider sees it
    assert bucket_deficit(events, bucket_capacity(rate, burst), rate) >= -1e-6
    # Under this backlog the steady state (after the first full window) runs at the
    # sustained rate; allow 20 % for a loaded two-core machine running three processes.
    first = min(t for t, _ in events)
    steady_from = first + WINDOW_US + 200_000
    steady = [(t, n) for t, n in events if t >= steady_from]
    span = (max(t for t, _ in events) - steady_from) / 1e6
    assert sum(n for _, n in steady) >= 0.8 * rate * span
