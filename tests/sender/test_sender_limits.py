"""The limiter's request limits, rolling daily quota and adaptive behaviour, with the clock
injected into the script (exact counts), and failing closed when Redis goes away."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, cast

import grpc
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sluice.common.errors import Unavailable
from sluice.common.providers import ProviderConfig
from sluice.common.telemetry import disabled
from sluice.sender.providers.sandbox import SandboxLedger, SandboxProvider
from sluice.sender.ratelimit import RateLimiter, even_requests, granted_of, jittered
from sluice.sender.render_pool import RenderPool
from sluice.sender.service import SenderServicer
from sluice.v1 import sender_pb2, sender_pb2_grpc
from tests.grpc_helpers import status_details
from tests.sender.sender_server import serving

T0 = 1_700_000_000_000_000  # µs; a whole hour, so quota hour buckets are easy to reason about
T0 -= T0 % 3_600_000_000
S = 1_000_000
WINDOW = 1_050_000

if {"requests_per_second", "request_burst", "daily_quota"} <= {
    f.name for f in fields(ProviderConfig)
}:
    _Config: type[ProviderConfig] = ProviderConfig
else:  # until the adapters branch's ProviderConfig (with these fields) is merged

    @dataclass(frozen=True)
    class _WithRequestLimits(ProviderConfig):
        requests_per_second: float = 0.0
        request_burst: int = 0
        daily_quota: int = 0

    _Config = _WithRequestLimits


def provider(rate: float = 0, burst: int = 0, **limits: Any) -> ProviderConfig:
    return _Config(
        name=f"p{uuid.uuid4().hex[:8]}",
        kind="sandbox",
        cost_per_thousand=0.1,
        sustained_rate=rate,
        burst=burst,
        intents=frozenset({"marketing"}),
        **limits,
    )


@pytest.fixture
def limiter(redis_client: aioredis.Redis, redis_prefix: str) -> RateLimiter:
    return RateLimiter(redis_client, redis_prefix)


async def test_request_limits_count_batches_not_messages(limiter: RateLimiter) -> None:
    p = provider(requests_per_second=2, request_burst=4)
    g = await limiter.acquire(p, even_requests(100, 10), now_us=T0)
    assert (g.granted, g.requests) == (40, 4)
    # Request bucket empty (0.5 s to the next token) and window full until T0 + 1.05 s.
    assert g.retry_after == pytest.approx(WINDOW / S)
    assert (await limiter.acquire(p, [1], now_us=T0 + WINDOW - 1)).granted == 0
    g = await limiter.acquire(p, even_requests(100, 10), now_us=T0 + WINDOW)
    # 2.1 tokens refilled: two more requests.
    assert (g.granted, g.requests) == (20, 2)
    # A short batch still costs a whole request.
    q = provider(requests_per_second=1, request_burst=1)
    assert (await limiter.acquire(q, [3], now_us=T0)).requests == 1
    assert (await limiter.acquire(q, [3], now_us=T0 + 1)).granted == 0


async def test_both_dimensions_grant_only_what_both_allow(limiter: RateLimiter) -> None:
    p = provider(50, 100, requests_per_second=2, request_burst=2)
    g = await limiter.acquire(p, even_requests(200, 30), now_us=T0)
    # Messages allow 100 = 4 requests of 30; requests allow 2: 60 messages.
    assert (g.granted, g.requests) == (60, 2)
    cap = await limiter.capacity(p, now_us=T0)
    assert cap.sustained_tokens == pytest.approx(40)
    assert cap.burst_available == 40
    assert cap.request_tokens == pytest.approx(0)
    assert cap.request_burst_available == 0
    assert cap.available == 40  # message view; the request limits add the retry-after


async def test_the_request_shape_is_granted_in_order_the_last_call_cut_short(
    limiter: RateLimiter,
) -> None:
    # Five calls of 100 (Resend's batch size), whatever max_batch_size says (100 here).
    shape = [100, 100, 100, 100, 100]
    g = await limiter.acquire(provider(requests_per_second=2, request_burst=2), shape, now_us=T0)
    assert (g.granted, g.requests) == (200, 2)
    # The messages run out inside the second call: it goes with 50.
    g = await limiter.acquire(provider(150, 150, request_burst=5), shape, now_us=T0)
    assert (g.granted, g.requests) == (150, 2)
    assert granted_of([list(range(i, i + 100)) for i in range(0, 500, 100)], g) == list(range(150))
    # Uneven calls (SendGrid packing by content): taken whole while both allow.
    g = await limiter.acquire(provider(request_burst=3), [3, 1, 1, 1, 4], now_us=T0)
    assert (g.granted, g.requests) == (5, 3)
    # Calls are taken in their order: a plan's second call holds messages 1 and 3.
    plan = [[0, 2], [1, 3], [4]]
    assert granted_of(plan, type(g)(granted=3, retry_after=0.0, requests=2)) == [0, 1, 2]


async def test_rolling_daily_quota(limiter: RateLimiter) -> None:
    p = provider(daily_quota=25)
    assert (await limiter.acquire(p, [10], now_us=T0)).granted == 10
    assert (await limiter.acquire(p, [10], now_us=T0 + 3_600 * S)).granted == 10
    g = await limiter.acquire(p, [10], now_us=T0 + 7_200 * S)
    assert g.granted == 5
    assert (await limiter.capacity(p, now_us=T0 + 7_200 * S)).daily_used == 25
    g = await limiter.acquire(p, [1], now_us=T0 + 7_200 * S)
    assert g.granted == 0
    # The first hour's 10 leave the rolling window 24 h after that hour began.
    assert g.retry_after == pytest.approx(22 * 3_600)
    assert (await limiter.acquire(p, [20], now_us=T0 + 24 * 3_600 * S)).granted == 10


async def test_throttle_reports_halve_the_rate_for_everyone_and_it_recovers(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    a = RateLimiter(redis_client, redis_prefix)
    b = RateLimiter(redis_client, redis_prefix)  # another replica: same Redis, same keys
    p = provider(10, 10)
    assert await a.report_throttled(p, now_us=T0) == pytest.approx(0.5)
    # Reports of the same throttled burst within the cooldown do not compound (and the
    # factor already recovers, 0.05 per second).
    assert await a.report_throttled(p, now_us=T0 + 500_000) == pytest.approx(0.525)
    g = await b.acquire(p, [100], now_us=T0 + 500_000)
    assert g.granted == 5  # burst 10 scaled to 5, bucket capacity too
    assert (await b.capacity(p, now_us=T0 + 500_000)).factor == pytest.approx(0.525)
    assert await b.report_throttled(p, now_us=T0 + S) == pytest.approx(0.275)
    # Recovery is linear, 0.05 per second, up to 1.
    assert (await a.capacity(p, now_us=T0 + 11 * S)).factor == pytest.approx(0.775)
    assert (await a.capacity(p, now_us=T0 + 30 * S)).factor == pytest.approx(1.0)
    assert (await a.acquire(p, [100], now_us=T0 + 30 * S)).granted == 10
    # Throttled once a second for good: it settles at the floor, never below.
    factors = [await a.report_throttled(p, now_us=T0 + (40 + i) * S) for i in range(30)]
    assert min(factors) >= 0.05
    assert factors[-1] == pytest.approx(0.05, abs=1e-4)


async def test_retry_after_pauses_every_replica_and_headers_cap_the_rate(
    limiter: RateLimiter,
) -> None:
    p = provider(10, 10, requests_per_second=10)
    await limiter.report_throttled(p, retry_after=2.0, now_us=T0)
    g = await limiter.acquire(p, [5], now_us=T0 + 500_000)
    assert g.granted == 0
    assert g.retry_after == pytest.approx(1.5)
    assert (await limiter.capacity(p, now_us=T0 + 500_000)).paused_for == pytest.approx(1.5)
    assert (await limiter.acquire(p, [5], now_us=T0 + 2 * S)).granted == 5
    # Headers of an accepted answer: the published 2 requests/s caps the configured 10/s,
    # without cutting the factor (0.5 from the report above, recovering).
    q = provider(requests_per_second=10)
    await limiter.report_throttled(q, published_rps=2, throttled=False, now_us=T0)
    cap = await limiter.capacity(q, now_us=T0)
    assert (cap.factor, cap.published_rps) == (pytest.approx(1.0), pytest.approx(2.0))
    g = await limiter.acquire(q, even_requests(100, 5), now_us=T0)
    assert (g.granted, g.requests) == (10, 2)  # bucket capacity = the published rate


async def test_a_published_rate_caps_the_request_burst_too(limiter: RateLimiter) -> None:
    # Configured for 10 requests at once; the provider announced 2 a second (its limit per
    # one-second window): more than 2 at once would be refused, whatever the rate.
    p = provider(requests_per_second=10, request_burst=10)
    await limiter.report_throttled(p, published_rps=2, throttled=False, now_us=T0)
    g = await limiter.acquire(p, [1] * 100, now_us=T0)
    assert (g.granted, g.requests) == (2, 2)
    assert (await limiter.acquire(p, [1] * 100, now_us=T0 + 500_000)).granted == 0
    # A fractional rate (30 a minute) still lets one request through at a time.
    q = provider()
    await limiter.report_throttled(q, published_rps=0.5, throttled=False, now_us=T0)
    assert (await limiter.acquire(q, [1] * 100, now_us=T0)).granted == 1
    assert (await limiter.acquire(q, [1] * 100, now_us=T0 + S)).granted == 0
    assert (await limiter.acquire(q, [1] * 100, now_us=T0 + 2 * S + 1)).granted == 1


async def test_an_unchanged_announcement_is_not_written_again(limiter: RateLimiter) -> None:
    p = provider(requests_per_second=10)
    assert await limiter.report_throttled(p, published_rps=2, throttled=False) == 1.0
    # Headers on every answer: the same rate again within the refresh costs no Redis call.
    assert await limiter.report_throttled(p, published_rps=2, throttled=False) is None
    assert await limiter.report_throttled(p, throttled=False) is None  # nothing to tell
    # A new rate, a pause or a throttle is always told.
    assert await limiter.report_throttled(p, published_rps=3, throttled=False) == 1.0
    assert await limiter.report_throttled(p, published_rps=3, retry_after=1, throttled=False)
    assert (await limiter.capacity(p)).published_rps == pytest.approx(3)
    assert await limiter.report_throttled(p, published_rps=3) == pytest.approx(0.5)


async def test_an_unlimited_provider_honours_a_reported_pause(
    limiter: RateLimiter, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    p = provider()
    assert (await limiter.acquire(p, [500])).granted == 500
    assert [k async for k in redis_client.scan_iter(match=f"{redis_prefix}:*")] == []
    await limiter.report_throttled(p, retry_after=30)
    g = await limiter.acquire(p, [500])
    assert g.granted == 0
    assert 29 < g.retry_after <= 30


def test_jitter_is_small_and_only_ever_later() -> None:
    draws = [jittered(1.0) for _ in range(200)]
    assert all(1.0 <= d <= 1.1 for d in draws)
    assert len(set(draws)) > 1
    assert jittered(0.0) == 0.0
    assert all(0.01 <= jittered(0.01) <= 0.015 for _ in range(50))


# --- Redis goes away --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _redis_server(port: int, workdir: str) -> Iterator[subprocess.Popen[bytes]]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None:
                raise RuntimeError("redis-server exited")
            subprocess.run(["sleep", "0.05"], check=True)
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def test_redis_down_sends_nothing_answers_unavailable_and_recovers(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """The limiter's Redis is a throwaway server this test kills and restarts; the sandbox
    records on the suite's Redis, so what reached the "provider" is counted independently."""
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="sluice-rl-redis-")
    config = provider(100, 100)
    lim_client = aioredis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 1)
    )
    pool = RenderPool(1)
    servicer = SenderServicer(
        {config.name: config},
        {config.name: SandboxProvider(config, redis_client, redis_prefix)},
        RateLimiter(lim_client, redis_prefix),
        disabled(),
        render_pool=pool,
    )
    ledger = SandboxLedger(redis_client, redis_prefix)
    request = sender_pb2.SendBatchRequest(
        provider=config.name,
        template=sender_pb2.TemplateContent(
            id="t",
            version=1,
            subject="Hi",
            html_body="<p>Hi</p>",
            text_body="Hi",
            from_address="noreply@example.com",
        ),
        messages=[
            sender_pb2.OutboundMessage(
                intent_id=f"i{i}", recipient=f"u{i}@example.com", idempotency_key=f"k{i}"
            )
            for i in range(5)
        ],
    )
    try:
        await pool.start()
        async with (
            serving(servicer) as sender_port,
            grpc.aio.insecure_channel(f"127.0.0.1:{sender_port}") as channel,
        ):
            stub = sender_pb2_grpc.SenderServiceStub(channel)
            with _redis_server(port, workdir):
                reply = await stub.SendBatch(request, timeout=10)
                assert {r.outcome for r in reply.results} == {sender_pb2.SEND_OUTCOME_ACCEPTED}
            # Killed: every call fails closed, promptly, with a retry hint, and sends nothing.
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.SendBatch(request, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                kinds = [d.type_url.rsplit(".", 1)[-1] for d in status_details(info.value).details]
                assert "RetryInfo" in kinds, kinds
            capacity_error = None
            try:
                await stub.GetCapacity(sender_pb2.GetCapacityRequest(), timeout=10)
            except grpc.aio.AioRpcError as exc:
                capacity_error = exc.code()
            assert capacity_error == grpc.StatusCode.UNAVAILABLE
            assert await ledger.sent_count(config.name) == 5
            # Back (empty: a restarted Redis lost its buckets, which start full again).
            with _redis_server(port, workdir):
                recovered = None
                codes = []
                for _ in range(50):
                    try:
                        recovered = await stub.SendBatch(request, timeout=10)
                        break
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
                        await asyncio.sleep(0.1)
                assert set(codes) <= {grpc.StatusCode.UNAVAILABLE}, codes
                assert recovered is not None, "the sender did not recover by itself"
                assert {r.outcome for r in recovered.results} == {sender_pb2.SEND_OUTCOME_ACCEPTED}
            assert await ledger.sent_count(config.name) == 10
    finally:
        await pool.aclose()
        await lim_client.aclose()
        shutil.rmtree(workdir, ignore_errors=True)


async def test_unreachable_limiter_raises_unavailable_with_retry_after() -> None:
    client = aioredis.Redis(host="127.0.0.1", port=_free_port(), retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(Unavailable) as info:
            await RateLimiter(client, "down").acquire(provider(10, 20), [1])
        assert 1.0 <= info.value.retry_after <= 1.1
    finally:
        await client.aclose()


async def test_preview_grants_what_acquire_would_and_reserves_nothing(
    limiter: RateLimiter,
) -> None:
    p = provider(10, 20, requests_per_second=2, request_burst=3, daily_quota=100)
    await limiter.acquire(p, [4], now_us=T0)
    for at in (T0 + 1, T0 + 300_000, T0 + 2 * S):
        first = await limiter.preview(p, even_requests(50, 5), now_us=at)
        again = await limiter.preview(p, even_requests(50, 5), now_us=at)
        assert first == again  # nothing was reserved
        real = await limiter.acquire(p, even_requests(50, 5), now_us=at)
        assert (real.granted, real.requests, real.retry_after) == (
            first.granted,
            first.requests,
            first.retry_after,
        ), at


async def test_get_capacity_shows_request_limits_quota_and_adaptive_state(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    p = provider(10, 20, requests_per_second=2, request_burst=4, daily_quota=1000)
    limiter = RateLimiter(redis_client, redis_prefix)
    pool = RenderPool(1)
    servicer = SenderServicer(
        {p.name: p},
        {p.name: SandboxProvider(p, redis_client, redis_prefix)},
        limiter,
        disabled(),
        render_pool=pool,
    )
    try:
        await limiter.acquire(p, [10, 5])
        await limiter.report_throttled(p, retry_after=30, published_rps=1.5)
        reply = await servicer.GetCapacity(
            sender_pb2.GetCapacityRequest(provider=p.name), cast(Any, None)
        )
    finally:
        await pool.aclose()
    (cap,) = reply.providers
    assert (cap.requests_per_second, cap.request_burst, cap.daily_quota) == (2, 4, 1000)
    assert cap.daily_used == 15
    # 15 messages = 2 requests of 10, against a request burst the factor halved to 2.
    assert cap.request_burst_available == 0
    assert cap.adaptive_factor == pytest.approx(0.5, abs=0.01)
    assert 29 < cap.paused_for.ToTimedelta().total_seconds() <= 30
    assert cap.published_requests_per_second == pytest.approx(1.5)
