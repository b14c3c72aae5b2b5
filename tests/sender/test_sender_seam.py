"""The servicer/adapter seam: the adapter gets every granted message in one call (it
chunks itself), the message fields reach it, and every adapter outcome has its status."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import grpc
import redis.asyncio as aioredis

from sluice.common.providers import ProviderConfig, SandboxSettings
from sluice.common.telemetry import disabled
from sluice.sender import app
from sluice.sender.providers.base import INTENT_TAG
from sluice.sender.providers.sandbox import SandboxLedger, SandboxProvider
from sluice.sender.ratelimit import RateLimiter
from sluice.sender.service import SenderServicer
from sluice.sender.settings import SenderSettings
from sluice.v1 import sender_pb2, sender_pb2_grpc
from tests.conftest import REDIS_URL

TEMPLATE = sender_pb2.TemplateContent(
    id="t",
    version=1,
    subject="Hi {{ name }}",
    html_body="<p>{{ name }}</p>",
    text_body="{{ name }}",
    variables=["name"],
    from_address="noreply@example.com",
    reply_to="team@example.com",
    headers={"X-Campaign": "winter", "X-Kind": "template"},
)


def message(i: int, **fields: Any) -> sender_pb2.OutboundMessage:
    return sender_pb2.OutboundMessage(
        intent_id=f"i-{i}", recipient=f"u{i}@example.com", variables={"name": "Ada"}, **fields
    )


async def test_one_adapter_call_per_batch_not_one_per_max_batch_size(
    tmp_path: Path, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    providers = tmp_path / "providers.toml"
    providers.write_text(
        '[[providers]]\nname = "box"\nkind = "sandbox"\ncost_per_thousand = 0.1\n'
        'intents = ["marketing"]\nmax_batch_size = 3\n'
    )
    settings = SenderSettings(
        redis_url=REDIS_URL, redis_prefix=redis_prefix, providers_file=str(providers)
    )
    async with (
        app.running(settings, disabled(), port=0) as handle,
        grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel,
    ):
        reply = await sender_pb2_grpc.SenderServiceStub(channel).SendBatch(
            sender_pb2.SendBatchRequest(
                provider="box", template=TEMPLATE, messages=[message(i) for i in range(7)]
            )
        )
    assert [r.outcome for r in reply.results] == [sender_pb2.SEND_OUTCOME_ACCEPTED] * 7
    # max_batch_size is the router's request size; the sandbox's shape is the whole batch.
    assert [n for _, n in await SandboxLedger(redis_client, redis_prefix).send_log("box")] == [7]


def _servicer(
    redis_client: aioredis.Redis, redis_prefix: str, **settings: Any
) -> tuple[SenderServicer, SandboxProvider]:
    config = ProviderConfig(
        name="box",
        kind="sandbox",
        cost_per_thousand=0.1,
        sustained_rate=0,
        burst=0,
        intents=frozenset({"marketing"}),
        settings=SandboxSettings(keep_last=10, **settings),
    )
    sandbox = SandboxProvider(config, redis_client, redis_prefix)
    servicer = SenderServicer(
        {"box": config}, {"box": sandbox}, RateLimiter(redis_client, redis_prefix), disabled()
    )
    return servicer, sandbox


async def test_reply_to_headers_tags_and_unsubscribe_reach_the_adapter(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    servicer, sandbox = _servicer(redis_client, redis_prefix)
    request = sender_pb2.SendBatchRequest(
        provider="box",
        template=TEMPLATE,
        messages=[
            message(
                1,
                reply_to="ada@example.com",
                headers={"X-Kind": "message"},
                tags={"campaign": "winter"},
                list_unsubscribe_url="https://example.com/u/1",
            ),
            message(2),
        ],
    )
    await servicer.SendBatch(request, cast(Any, None))
    first, second = sandbox.recent()
    assert first.reply_to == "ada@example.com"
    assert dict(first.headers) == {"X-Campaign": "winter", "X-Kind": "message"}
    assert first.all_tags() == ((INTENT_TAG, "i-1"), ("campaign", "winter"))
    assert ("List-Unsubscribe", "<https://example.com/u/1>") in first.all_headers()
    assert second.reply_to == "team@example.com"
    assert dict(second.headers) == {"X-Campaign": "winter", "X-Kind": "template"}
    assert second.list_unsubscribe_url == ""


async def test_provider_throttled_and_unknown_have_their_statuses(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    for injected, status in [
        ({"throttle_rate": 1.0, "throttle_retry_after": 3.0}, sender_pb2.SEND_OUTCOME_THROTTLED),
        ({"unknown_rate": 1.0}, sender_pb2.SEND_OUTCOME_UNKNOWN),
    ]:
        servicer, _ = _servicer(redis_client, redis_prefix, **injected)
        reply = await servicer.SendBatch(
            sender_pb2.SendBatchRequest(provider="box", template=TEMPLATE, messages=[message(1)]),
            cast(Any, None),
        )
        assert [r.outcome for r in reply.results] == [status]
    assert reply.results[0].reason == "sandbox: injected"
