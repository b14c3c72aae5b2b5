"""SenderService over a real gRPC channel with real Redis and the sandbox provider."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis.asyncio as aioredis

from sluice.common.errors import Unavailable
from sluice.common.providers import ProviderConfig
from sluice.common.telemetry import disabled
from sluice.sender import app
from sluice.sender.providers.sandbox import SandboxLedger
from sluice.sender.ratelimit import RateLimiter
from sluice.sender.render_pool import RenderPool
from sluice.sender.service import SenderServicer
from sluice.sender.settings import SenderSettings
from sluice.v1 import sender_pb2, sender_pb2_grpc
from tests.conftest import REDIS_URL

PROVIDERS = """
[[providers]]
name = "slow"
kind = "sandbox"
cost_per_thousand = 0.1
sustained_rate = 5
burst = 10
intents = ["marketing"]
max_batch_size = 3

[[providers]]
name = "fast"
kind = "sandbox"
cost_per_thousand = 0.2
intents = ["marketing", "transactional"]

[[providers]]
name = "off"
kind = "sandbox"
cost_per_thousand = 0.2
intents = ["marketing"]
enabled = false
"""

TEMPLATE = sender_pb2.TemplateContent(
    id="t",
    version=1,
    subject="Hello {{ name }}",
    html_body="<p>{{ name }}</p>",
    text_body="{{ name }}",
    variables=["name"],
    from_address="noreply@example.com",
)


@pytest.fixture
async def stub(
    tmp_path: Path, redis_prefix: str, redis_client: aioredis.Redis
) -> AsyncIterator[sender_pb2_grpc.SenderServiceStub]:
    providers = tmp_path / "providers.toml"
    providers.write_text(PROVIDERS)
    settings = SenderSettings(
        redis_url=REDIS_URL, redis_prefix=redis_prefix, providers_file=str(providers)
    )
    async with (
        app.running(settings, disabled(), port=0) as handle,
        grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel,
    ):
        yield sender_pb2_grpc.SenderServiceStub(channel)


def messages(
    n: int, domain: str = "example.com", **variables: str
) -> list[sender_pb2.OutboundMessage]:
    return [
        sender_pb2.OutboundMessage(
            intent_id=f"i-{i}",
            recipient=f"user{i}@{domain}",
            variables=variables or {"name": f"<b>{i}</b>"},
            idempotency_key=f"k-{i}",
        )
        for i in range(n)
    ]


async def test_burst_allows_some_and_throttles_the_rest(
    stub: sender_pb2_grpc.SenderServiceStub, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    reply = await stub.SendBatch(
        sender_pb2.SendBatchRequest(provider="slow", template=TEMPLATE, messages=messages(25))
    )
    outcomes = [r.outcome for r in reply.results]
    assert [r.intent_id for r in reply.results] == [f"i-{i}" for i in range(25)]
    accepted = outcomes.count(sender_pb2.SEND_OUTCOME_ACCEPTED)
    throttled = outcomes.count(sender_pb2.SEND_OUTCOME_THROTTLED)
    assert accepted == 10  # the bucket starts full at burst size
    assert throttled == 15
    assert all(r.provider_message_id for r in reply.results[:10])
    for r in reply.results[10:]:
        assert r.retry_after.seconds > 0 or r.retry_after.nanos > 0
    assert await SandboxLedger(redis_client, redis_prefix).sent_count("slow") == 10


async def test_per_message_failures_do_not_fail_the_batch(
    stub: sender_pb2_grpc.SenderServiceStub,
) -> None:
    msgs = (
        messages(2)
        + messages(1, domain="fail.sandbox.example")
        + messages(1, domain="flaky.sandbox.example")
    )
    msgs.append(sender_pb2.OutboundMessage(intent_id="no-vars", recipient="x@example.com"))
    reply = await stub.SendBatch(
        sender_pb2.SendBatchRequest(provider="fast", template=TEMPLATE, messages=msgs)
    )
    assert [r.outcome for r in reply.results] == [
        sender_pb2.SEND_OUTCOME_ACCEPTED,
        sender_pb2.SEND_OUTCOME_ACCEPTED,
        sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE,
        sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE,
        sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE,
    ]
    assert "name" in reply.results[4].reason


async def test_bad_requests_get_precise_statuses(stub: sender_pb2_grpc.SenderServiceStub) -> None:
    cases = [
        (
            sender_pb2.SendBatchRequest(provider="nope", template=TEMPLATE, messages=messages(1)),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            sender_pb2.SendBatchRequest(template=TEMPLATE, messages=messages(1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            sender_pb2.SendBatchRequest(provider="off", template=TEMPLATE, messages=messages(1)),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            sender_pb2.SendBatchRequest(provider="fast", messages=messages(1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for request, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SendBatch(request)
        assert info.value.code() == code, request


async def test_capacity_reflects_use(stub: sender_pb2_grpc.SenderServiceStub) -> None:
    before = await stub.GetCapacity(sender_pb2.GetCapacityRequest(provider="slow"))
    assert before.providers[0].burst_available == 10
    await stub.SendBatch(
        sender_pb2.SendBatchRequest(provider="slow", template=TEMPLATE, messages=messages(4))
    )
    after = await stub.GetCapacity(sender_pb2.GetCapacityRequest(provider="slow"))
    assert after.providers[0].burst_available == 6
    everything = await stub.GetCapacity(sender_pb2.GetCapacityRequest())
    by_name = {p.provider: p for p in everything.providers}
    assert by_name["fast"].unlimited
    assert not by_name["slow"].unlimited


class _Unreachable:
    """An adapter whose provider cannot be reached: nothing is handed over."""

    name = "fast"
    largest_request = None

    def plan(self, messages: list[object]) -> list[list[int]]:
        return [list(range(len(messages)))]

    async def send_batch(self, messages: object) -> list[object]:
        raise Unavailable("connection refused")

    async def aclose(self) -> None:
        return None


async def test_unreachable_provider_answers_provider_unavailable(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    # Not TRANSIENT_FAILURE: that would spend an attempt per retry and turn an outage
    # into failed intents (found by tests/e2e/test_e2e_crashes.py with Redis killed).
    config = ProviderConfig(
        name="fast",
        kind="sandbox",
        cost_per_thousand=0.1,
        sustained_rate=0,
        burst=0,
        intents=frozenset({"marketing"}),
    )
    pool = RenderPool(1)
    servicer = SenderServicer(
        {"fast": config},
        {"fast": cast(Any, _Unreachable())},
        RateLimiter(redis_client, redis_prefix),
        disabled(),
        render_pool=pool,
    )
    try:
        reply = await servicer.SendBatch(
            sender_pb2.SendBatchRequest(provider="fast", template=TEMPLATE, messages=messages(3)),
            cast(Any, None),
        )
    finally:
        await pool.aclose()
    assert [r.outcome for r in reply.results] == [sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE] * 3
    assert all(r.reason == "connection refused" for r in reply.results)
