"""What providers announce reaches every replica's limiter: two senders configured far above
the limit the Resend and SendGrid stand-ins publish in their headers (over real HTTP,
limiter in real Redis) keep to it, without a refusal and without cutting the adaptive
factor; a used-up SES quota pauses the provider and leaves its rate alone."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from sluice.common.providers import (
    ProviderConfig,
    ResendSettings,
    Secret,
    SendGridSettings,
    SesSettings,
)
from sluice.common.telemetry import disabled
from sluice.sender.providers import build_adapters
from sluice.sender.ratelimit import RateLimiter
from sluice.sender.render_pool import RenderPool
from sluice.sender.service import SenderServicer
from sluice.v1 import sender_pb2
from tests.fakes.http_base import FakeHttpServer
from tests.fakes.resend_fake import FakeResend
from tests.fakes.sendgrid_fake import FakeSendGrid
from tests.fakes.ses_fake import REGION, FakeSesErrors

KEY = "key-for-the-fake"
TEMPLATE = sender_pb2.TemplateContent(
    id="t",
    version=1,
    subject="Hi {{ name }}",
    html_body="<p>Hi {{ name }}</p>",
    text_body="Hi {{ name }}",
    variables=["name"],
    from_address="Sluice <noreply@sluice.example>",
)
ANNOUNCED_PER_SECOND = 2
CONFIGURED_PER_SECOND = 20  # ten times what the provider allows


@pytest.fixture
async def pool() -> AsyncIterator[RenderPool]:
    render_pool = RenderPool(1)
    try:
        yield render_pool
    finally:
        await render_pool.aclose()


def _config(kind: str, url: str, **limits: Any) -> ProviderConfig:
    settings: Any = {
        "resend": lambda: ResendSettings(api_key=Secret("value", KEY), base_url=url),
        "sendgrid": lambda: SendGridSettings(api_key=Secret("value", KEY), base_url=url),
        "ses": lambda: SesSettings(
            region=REGION,
            endpoint_url=url,
            access_key_id=Secret("value", "testing"),
            secret_access_key=Secret("value", "testing"),
        ),
    }[kind]()
    return ProviderConfig(
        name=f"{kind}-{uuid.uuid4().hex[:8]}",
        kind=kind,
        cost_per_thousand=0.1,
        sustained_rate=limits.pop("sustained_rate", 0),
        burst=limits.pop("burst", 0),
        intents=frozenset({"marketing"}),
        settings=settings,
        **limits,
    )


def _request(config: ProviderConfig, n: int) -> sender_pb2.SendBatchRequest:
    return sender_pb2.SendBatchRequest(
        provider=config.name,
        template=TEMPLATE,
        messages=[
            sender_pb2.OutboundMessage(
                intent_id=f"i-{n}",
                recipient=f"u{n}@example.com",
                variables={"name": "Ada"},
                idempotency_key=f"k-{n}",
            )
        ],
    )


@contextlib.asynccontextmanager
async def _replicas(
    config: ProviderConfig,
    redis_client: aioredis.Redis,
    prefix: str,
    pool: RenderPool,
    count: int = 2,
) -> AsyncIterator[list[SenderServicer]]:
    """``count`` senders of one provider: each its own limiter and client, one Redis."""
    async with contextlib.AsyncExitStack() as stack:
        servicers = []
        for _ in range(count):
            adapters = await build_adapters(
                [config], stack, redis=redis_client, prefix=prefix, environ={}
            )
            servicers.append(
                SenderServicer(
                    {config.name: config},
                    adapters,
                    RateLimiter(redis_client, prefix),
                    disabled(),
                    render_pool=pool,
                )
            )
        yield servicers


async def _capacity(servicer: SenderServicer, config: ProviderConfig) -> Any:
    reply = await servicer.GetCapacity(
        sender_pb2.GetCapacityRequest(provider=config.name), cast(Any, None)
    )
    return reply.providers[0]


@pytest.mark.parametrize("kind", ["resend", "sendgrid"])
async def test_senders_configured_above_the_announced_limit_keep_to_it(
    kind: str, redis_client: aioredis.Redis, redis_prefix: str, pool: RenderPool
) -> None:
    fakes: dict[str, type[FakeHttpServer]] = {"resend": FakeResend, "sendgrid": FakeSendGrid}
    fake = fakes[kind](api_key=KEY, requests_per_second=ANNOUNCED_PER_SECOND)  # type: ignore[call-arg]
    async with fake:
        config = _config(
            kind,
            fake.url,
            requests_per_second=CONFIGURED_PER_SECOND,
            request_burst=CONFIGURED_PER_SECOND,
        )
        async with _replicas(config, redis_client, redis_prefix, pool) as replicas:
            accepted, refused, n = 0, [], 0
            deadline = time.monotonic() + 60
            # The two replicas take turns, as fast as their limiters let them, until three
            # of the provider's windows' worth went out.
            while accepted < 3 * ANNOUNCED_PER_SECOND and time.monotonic() < deadline:
                n += 1
                [result] = (
                    await replicas[n % 2].SendBatch(_request(config, n), cast(Any, None))
                ).results
                if result.outcome == sender_pb2.SEND_OUTCOME_ACCEPTED:
                    accepted += 1
                    continue
                assert result.outcome == sender_pb2.SEND_OUTCOME_THROTTLED, result
                if result.reason:  # the provider's own 429 (the limiter's carry no reason)
                    refused.append(result.reason)
                await asyncio.sleep(result.retry_after.ToTimedelta().total_seconds())
            cap = await _capacity(replicas[0], config)
    assert accepted == 3 * ANNOUNCED_PER_SECOND
    # Configured at ten times the limit, neither replica ever went over it: no 429, so the
    # adaptive factor was never cut (the limiter used what the headers said instead).
    assert refused == []
    assert cap.adaptive_factor == pytest.approx(1.0)
    # Resend says its rate (limit per one-second window); SendGrid only when to resume.
    expected = ANNOUNCED_PER_SECOND if kind == "resend" else 0
    assert cap.published_requests_per_second == pytest.approx(expected)


async def test_a_used_up_ses_quota_pauses_without_cutting_the_rate(
    redis_client: aioredis.Redis, redis_prefix: str, pool: RenderPool
) -> None:
    async with FakeSesErrors() as errors:
        quota = _config("ses", errors.url, sustained_rate=14, burst=14)
        rate = _config("ses", errors.url, sustained_rate=14, burst=14)
        errors.answers = [
            (400, "ThrottlingException", "Daily message quota exceeded."),
            (400, "ThrottlingException", "Maximum sending rate exceeded."),
        ]
        async with (
            _replicas(quota, redis_client, redis_prefix, pool, count=1) as [by_quota],
            _replicas(rate, redis_client, redis_prefix, pool, count=1) as [by_rate],
        ):
            [paused] = (await by_quota.SendBatch(_request(quota, 1), cast(Any, None))).results
            [slowed] = (await by_rate.SendBatch(_request(rate, 2), cast(Any, None))).results
            quota_cap = await _capacity(by_quota, quota)
            rate_cap = await _capacity(by_rate, rate)
    assert paused.outcome == slowed.outcome == sender_pb2.SEND_OUTCOME_THROTTLED
    assert paused.reason.startswith("quota exhausted; paused_until=")
    # The quota: every replica holds off until it resets; the rate is not its problem.
    assert quota_cap.adaptive_factor == pytest.approx(1.0)
    assert 3590 < quota_cap.paused_for.ToTimedelta().total_seconds() <= 3600
    # The rate: halved for everyone, and a one-second pause.
    assert rate_cap.adaptive_factor == pytest.approx(0.5, abs=0.01)
    assert rate_cap.paused_for.ToTimedelta().total_seconds() <= 1
