"""10,000 hostile messages through a real sender into real stand-ins of three providers: an
aiosmtpd SMTP sink, the local Resend fake and the local SendGrid fake, over real gRPC,
SMTP and HTTP. Every nasty fragment tries to smuggle a recipient (``victim@evil.example``)
or a header (``X-Injected``); whatever the providers received is searched for them."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from sluice.common.providers import (
    ProviderConfig,
    ResendSettings,
    Secret,
    SendGridSettings,
    SmtpSettings,
)
from sluice.common.telemetry import disabled
from sluice.sender.checks import MessageChecks
from sluice.sender.providers import build_adapters
from sluice.sender.ratelimit import RateLimiter
from sluice.sender.render_pool import RenderPool
from sluice.sender.service import SenderServicer
from sluice.v1 import sender_pb2, sender_pb2_grpc
from tests.fakes.resend_fake import FakeResend
from tests.fakes.sendgrid_fake import FakeSendGrid
from tests.fakes.smtp_fake import SmtpSink
from tests.sender.sender_server import serving

pytestmark = pytest.mark.slow

KEY = "fuzz-key"
NASTY = [
    "\r\nBcc: victim@evil.example",
    "\nX-Injected: 1",
    "\rX-Injected: 1",
    "\r\n\r\nX-Injected: body",
    "\u2028X-Injected: 1",
    "\x85X-Injected: 1",
    "\x0bX-Injected: 1",
    "\x00",
    "%0d%0aBcc:victim@evil.example",
    "=?utf-8?q?=0D=0ABcc:_victim@evil.example?=",
    ", victim@evil.example",
    ">, <victim@evil.example",
    '"\r\nX-Injected: 1\r\n"',
    ";",
    "\t",
    "josé",
    "a" * 300,
]


def hostile(rng: random.Random, clean: str, keep: float = 0.6) -> str:
    if rng.random() < keep:
        return clean
    value = clean
    for _ in range(rng.randint(1, 2)):
        at = rng.randint(0, len(value))
        value = value[:at] + rng.choice(NASTY) + value[at:]
    return value


def config(name: str, kind: str, settings: Any) -> ProviderConfig:
    return ProviderConfig(
        name=name,
        kind=kind,
        cost_per_thousand=0.1,
        sustained_rate=0,
        burst=0,
        intents=frozenset({"marketing"}),
        settings=settings,
    )


@contextlib.asynccontextmanager
async def sender(
    configs: list[ProviderConfig], redis: aioredis.Redis, prefix: str
) -> AsyncIterator[sender_pb2_grpc.SenderServiceStub]:
    async with contextlib.AsyncExitStack() as stack:
        adapters = await build_adapters(configs, stack, redis=redis, prefix=prefix)
        pool = RenderPool(1)
        stack.push_async_callback(pool.aclose)
        await pool.start()
        servicer = SenderServicer(
            {c.name: c for c in configs},
            adapters,
            RateLimiter(redis, prefix),
            disabled(),
            render_pool=pool,
            checks=MessageChecks(frozenset({"example.com"})),
        )
        port = await stack.enter_async_context(serving(servicer))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stack.push_async_callback(channel.close)
        yield sender_pb2_grpc.SenderServiceStub(channel)


def batch(rng: random.Random, provider: str, b: int, size: int) -> sender_pb2.SendBatchRequest:
    template = sender_pb2.TemplateContent(
        id=f"fz{b}",
        version=1,
        subject="Re: {{ name }}",
        html_body="<p>{{ name }}</p>",
        text_body="{{ name }}",
        variables=["name"],
        from_address=hostile(rng, "Sluice <noreply@example.com>", keep=0.8),
        reply_to=hostile(rng, "help@example.com", keep=0.8),
        headers={hostile(rng, "X-Campaign", keep=0.8): hostile(rng, "spring", keep=0.8)},
    )
    messages = [
        sender_pb2.OutboundMessage(
            intent_id=f"fz-{provider}-{b}-{i}",
            recipient=hostile(rng, f"user{i}@example.org"),
            variables={"name": hostile(rng, f"User {i}")},
            idempotency_key=f"k-{provider}-{b}-{i}",
            reply_to=hostile(rng, "", keep=0.8),
            headers={"X-Ref": hostile(rng, f"r{i}")},
            tags={"campaign": hostile(rng, "spring", keep=0.8)},
            list_unsubscribe_url=hostile(rng, f"https://example.com/u/{i}", keep=0.8),
        )
        for i in range(size)
    ]
    return sender_pb2.SendBatchRequest(provider=provider, template=template, messages=messages)


_BODY_KEYS = ("html", "text", "value")  # message bodies: free text, not header-bound
_BREAKS = ("\r", "\n", "\x00", "\x85", "\u2028", "\u2029", "\x0b", "\x0c")


def wire_injections(node: Any, key: str = "") -> int:
    """Injections in a provider's JSON request: an extra recipient or a Bcc/Cc/X-Injected
    field anywhere, or a line break in any header-bound string (everything but bodies)."""
    found = 0
    if isinstance(node, dict):
        for k, v in node.items():
            if k.lower() in ("bcc", "cc", "x-injected"):
                found += 1
            found += wire_injections(v, k)
    elif isinstance(node, list):
        found += sum(wire_injections(v, key) for v in node)
    elif isinstance(node, str) and key not in _BODY_KEYS:
        found += any(b in node for b in _BREAKS)
        if key in ("to", "email") and "evil.example" in node.lower():
            found += 1
    return found


async def test_fuzz_10000_hostile_messages_inject_nothing_at_real_providers(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    rng = random.Random(7)
    async with (
        SmtpSink() as smtp,
        FakeResend(api_key=KEY) as resend,
        FakeSendGrid(api_key=KEY) as sendgrid,
    ):
        configs = [
            config("smtp", "smtp", SmtpSettings(host="127.0.0.1", port=smtp.port, tls="none")),
            config(
                "resend",
                "resend",
                ResendSettings(api_key=Secret("value", KEY), base_url=resend.url),
            ),
            config(
                "sendgrid",
                "sendgrid",
                SendGridSettings(api_key=Secret("value", KEY), base_url=sendgrid.url),
            ),
        ]
        total = accepted = 0
        async with sender(configs, redis_client, redis_prefix) as stub:
            for b in range(100):
                provider = ("smtp", "resend", "sendgrid")[b % 3]
                request = batch(rng, provider, b, 100)
                total += len(request.messages)
                reply = await stub.SendBatch(request, timeout=60)
                assert len(reply.results) == len(request.messages)
                accepted += sum(
                    r.outcome == sender_pb2.SEND_OUTCOME_ACCEPTED for r in reply.results
                )
        assert total == 10_000
        # The sinks must have received plenty, or finding nothing in them proves nothing.
        assert len(smtp.received) > 150, len(smtp.received)
        assert len(resend.emails) > 150, len(resend.emails)
        assert len(sendgrid.messages) > 150, len(sendgrid.messages)
        assert accepted >= len(smtp.received) + len(resend.emails)

        injected = 0
        for got in smtp.received:
            # Exactly the one intended recipient, and no header we did not mean to write.
            injected += len(got.rcpt_tos) != 1
            injected += sum(r.lower().endswith("evil.example") for r in got.rcpt_tos)
            names = [k.lower() for k in got.message]
            injected += sum(n in ("bcc", "cc", "x-injected") for n in names)
            injected += sum(names.count(n) > 1 for n in ("from", "to", "subject", "reply-to"))
        injected += sum(wire_injections(item) for item in resend.emails)
        injected += sum(wire_injections(json.loads(r["body"])) for r in sendgrid.requests)
        assert injected == 0
