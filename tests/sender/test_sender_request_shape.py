"""Request limits count the calls the adapter really makes, not ``max_batch_size``: a
provider limited to 2 requests a second (burst 2) with ``max_batch_size = 500`` gets 500
messages through the servicer (limiter in real Redis, the Resend and SendGrid stand-ins
over real HTTP, which count every request) and never sees more than it allows. Before the
adapters planned their calls, one SendBatch of 500 reserved one request and made five
(Resend, 100 a request) or 500 (SendGrid, per-recipient content)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from sluice.common.providers import ProviderConfig, ResendSettings, Secret, SendGridSettings
from sluice.common.telemetry import disabled
from sluice.sender.providers import build_adapters
from sluice.sender.ratelimit import RateLimiter
from sluice.sender.render_pool import RenderPool
from sluice.sender.service import SenderServicer
from sluice.v1 import sender_pb2
from tests.fakes.http_base import FakeHttpServer
from tests.fakes.resend_fake import FakeResend
from tests.fakes.sendgrid_fake import FakeSendGrid

KEY = "key-for-the-fake"
RPS, BURST = 2, 2
MESSAGES = 500
# Per-recipient content: every rendered body differs, so SendGrid packs one a request.
TEMPLATE = sender_pb2.TemplateContent(
    id="t",
    version=1,
    subject="Hi {{ name }}",
    html_body="<p>Hi {{ name }}</p>",
    text_body="Hi {{ name }}",
    variables=["name"],
    from_address="Sluice <noreply@sluice.example>",
)
ACCEPTED = sender_pb2.SEND_OUTCOME_ACCEPTED
THROTTLED = sender_pb2.SEND_OUTCOME_THROTTLED


@pytest.fixture
async def pool() -> AsyncIterator[RenderPool]:
    render_pool = RenderPool(1)
    try:
        yield render_pool
    finally:
        await render_pool.aclose()


def _config(kind: str, url: str) -> ProviderConfig:
    settings: Any = (
        ResendSettings(api_key=Secret("value", KEY), base_url=url)
        if kind == "resend"
        else SendGridSettings(api_key=Secret("value", KEY), base_url=url)
    )
    return ProviderConfig(
        name=f"{kind}-{uuid.uuid4().hex[:8]}",
        kind=kind,
        cost_per_thousand=0.1,
        sustained_rate=0,
        burst=0,
        intents=frozenset({"marketing"}),
        settings=settings,
        max_batch_size=MESSAGES,
        requests_per_second=RPS,
        request_burst=BURST,
    )


def _message(n: int) -> sender_pb2.OutboundMessage:
    return sender_pb2.OutboundMessage(
        intent_id=f"i-{n}",
        recipient=f"u{n}@example.com",
        variables={"name": f"reader {n}"},
        idempotency_key=f"k-{n}",
    )


@contextlib.asynccontextmanager
async def _sender(
    kind: str, redis_client: aioredis.Redis, prefix: str, pool: RenderPool
) -> AsyncIterator[tuple[SenderServicer, ProviderConfig, FakeHttpServer]]:
    fake: FakeHttpServer = FakeResend(api_key=KEY) if kind == "resend" else FakeSendGrid(KEY)
    async with fake, contextlib.AsyncExitStack() as stack:
        config = _config(kind, fake.url)
        adapters = await build_adapters(
            [config], stack, redis=redis_client, prefix=prefix, environ={}
        )
        servicer = SenderServicer(
            {config.name: config},
            adapters,
            RateLimiter(redis_client, prefix),
            disabled(),
            render_pool=pool,
        )
        yield servicer, config, fake


async def _send(
    servicer: SenderServicer, config: ProviderConfig, messages: list[sender_pb2.OutboundMessage]
) -> list[sender_pb2.SendResult]:
    request = sender_pb2.SendBatchRequest(
        provider=config.name, template=TEMPLATE, messages=messages
    )
    return list((await servicer.SendBatch(request, cast(Any, None))).results)


@pytest.mark.parametrize(("kind", "per_request"), [("resend", 100), ("sendgrid", 1)])
async def test_one_batch_of_500_reserves_and_makes_only_the_granted_requests(
    kind: str, per_request: int, redis_client: aioredis.Redis, redis_prefix: str, pool: RenderPool
) -> None:
    async with _sender(kind, redis_client, redis_prefix, pool) as (servicer, config, fake):
        results = await _send(servicer, config, [_message(n) for n in range(MESSAGES)])
        made = len(fake.requests)
    # The burst's two requests, each as full as the provider's shape allows; the rest
    # throttled by the limiter (no provider reason), with its retry-after, in order.
    assert made == BURST
    granted = BURST * per_request
    assert [r.intent_id for r in results] == [f"i-{n}" for n in range(MESSAGES)]
    assert [r.outcome for r in results[:granted]] == [ACCEPTED] * granted
    rest = results[granted:]
    assert {r.outcome for r in rest} == {THROTTLED}
    assert {r.reason for r in rest} == {""}
    waits = [r.retry_after.ToTimedelta().total_seconds() for r in rest]
    # The window of 1.05 s (plus up to 10 % jitter) until the request burst frees up.
    assert min(waits) > 0
    assert max(waits) <= 1.05 * 1.1 + 0.01


async def test_resend_sends_all_500_in_five_requests_within_the_request_rate(
    redis_client: aioredis.Redis, redis_prefix: str, pool: RenderPool
) -> None:
    async with _sender("resend", redis_client, redis_prefix, pool) as (servicer, config, fake):
        pending = [_message(n) for n in range(MESSAGES)]
        per_call: list[int] = []
        started = time.monotonic()
        deadline = started + 60
        while pending and time.monotonic() < deadline:
            before = len(fake.requests)
            results = await _send(servicer, config, pending)
            per_call.append(len(fake.requests) - before)
            throttled = {r.intent_id for r in results if r.outcome == THROTTLED}
            assert all(r.outcome in (ACCEPTED, THROTTLED) and not r.reason for r in results)
            pending = [m for m in pending if m.intent_id in throttled]
            if pending:
                wait = max(r.retry_after.ToTimedelta().total_seconds() for r in results)
                await asyncio.sleep(wait)
        elapsed = time.monotonic() - started
        emails = len(cast(FakeResend, fake).emails)
    assert pending == []
    assert emails == MESSAGES
    assert len(fake.requests) == MESSAGES // 100
    assert max(per_call) <= BURST
    # A token bucket of 2 refilled at 2/s: a slower (busier) run only allows more.
    assert len(fake.requests) <= BURST + RPS * elapsed
