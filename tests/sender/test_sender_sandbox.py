"""The sandbox provider against real Redis: outcomes by domain, and the shared ledger."""

from __future__ import annotations

import asyncio
import socket
import time
from types import MappingProxyType

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sluice.common.errors import ConfigError, Unavailable
from sluice.common.providers import ProviderConfig
from sluice.sender.providers import (
    EmailProvider,
    OutboundEmail,
    SandboxLedger,
    SandboxProvider,
    build_provider,
)


def config(kind: str = "sandbox", name: str = "ses", **options: str) -> ProviderConfig:
    return ProviderConfig(
        name=name,
        kind=kind,
        cost_per_thousand=0.1,
        sustained_rate=14,
        burst=30,
        intents=frozenset({"marketing"}),
        options=MappingProxyType(options),
    )


def email(intent_id: str, recipient: str) -> OutboundEmail:
    return OutboundEmail(
        intent_id=intent_id,
        recipient=recipient,
        from_address="Sluice <noreply@sluice.test>",
        subject="s",
        html="<p>h</p>",
        text="t",
        idempotency_key=f"k-{intent_id}",
    )


async def test_outcomes_by_domain_in_order_and_recorded(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    provider = build_provider(config(), redis=redis_client, prefix=redis_prefix)
    assert isinstance(provider, SandboxProvider)
    assert provider.name == "ses"
    before = time.time_ns() // 1000
    results = await provider.send_batch(
        [
            email("i1", "a@example.com"),
            email("i2", "b@FAIL.sandbox.example"),
            email("i3", "c@flaky.sandbox.example"),
            email("i4", "d@example.org"),
        ]
    )
    after = time.time_ns() // 1000
    assert [r.intent_id for r in results] == ["i1", "i2", "i3", "i4"]
    assert [r.outcome for r in results] == ["accepted", "permanent", "transient", "accepted"]
    assert results[1].reason == "mailbox does not exist"
    assert results[2].reason
    accepted_ids = [results[0].provider_message_id, results[3].provider_message_id]
    assert all(m.startswith("sandbox-") and len(m) == 40 for m in accepted_ids)
    assert len(set(accepted_ids)) == 2
    assert results[1].provider_message_id == ""

    ledger = SandboxLedger(redis_client, redis_prefix)
    assert await ledger.sent_count("ses") == 2
    [(at_us, count)] = await ledger.send_log("ses")
    assert count == 2
    assert before <= at_us <= after
    assert await ledger.sent_ids("ses") == ["i1", "i4"]
    # Every record carries the provider's hash tag.
    keys = {k.decode() async for k in redis_client.scan_iter(match=f"{redis_prefix}:*")}
    assert keys == {f"{redis_prefix}:sandbox:{{ses}}:{what}" for what in ("count", "log", "ids")}
    await provider.aclose()


async def test_options_change_domains_latency_and_id_recording(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    provider = SandboxProvider(
        config(
            name="resend",
            fail_domains="bad.test, worse.test",
            flaky_domains="",
            latency_ms="50",
            record_ids="false",
        ),
        redis_client,
        redis_prefix,
    )
    start = time.monotonic()
    results = await provider.send_batch(
        [
            email("a", "x@worse.test"),
            email("b", "x@flaky.sandbox.example"),  # no longer flaky: the option replaced it
            email("c", "x@fail.sandbox.example"),
        ]
    )
    assert time.monotonic() - start >= 0.05
    assert [r.outcome for r in results] == ["permanent", "accepted", "accepted"]
    ledger = SandboxLedger(redis_client, redis_prefix)
    assert await ledger.sent_count("resend") == 2
    assert await ledger.sent_ids("resend") == []
    assert await ledger.sent_count("ses") == 0


async def test_concurrent_batches_are_all_counted(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    providers = [SandboxProvider(config(), redis_client, redis_prefix) for _ in range(4)]
    batches = [
        [email(f"p{p}-b{b}-m{m}", "ok@example.com") for m in range(10)]
        for p in range(4)
        for b in range(5)
    ]
    await asyncio.gather(*(providers[i % 4].send_batch(batch) for i, batch in enumerate(batches)))
    ledger = SandboxLedger(redis_client, redis_prefix)
    assert await ledger.sent_count("ses") == 200
    log = await ledger.send_log("ses")
    assert len(log) == 20
    assert sum(n for _, n in log) == 200
    assert sorted(await ledger.sent_ids("ses")) == sorted(e.intent_id for b in batches for e in b)


async def test_batch_with_nothing_accepted_writes_nothing(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    provider = SandboxProvider(config(), redis_client, redis_prefix)
    results = await provider.send_batch([email("a", "x@fail.sandbox.example")])
    assert results[0].outcome == "permanent"
    assert await provider.send_batch([]) == []
    assert [k async for k in redis_client.scan_iter(match=f"{redis_prefix}:*")] == []


async def test_redis_down_is_unavailable_for_provider_and_ledger() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = aioredis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
    try:
        provider: EmailProvider = SandboxProvider(config(), client, "down")
        with pytest.raises(Unavailable, match="sandbox provider 'ses'"):
            await provider.send_batch([email("a", "x@example.com")])
        with pytest.raises(Unavailable, match="sandbox ledger"):
            await SandboxLedger(client, "down").sent_count("ses")
    finally:
        await client.aclose()


def test_bad_options_and_unknown_kinds_are_config_errors(redis_client: aioredis.Redis) -> None:
    with pytest.raises(ConfigError, match="latency_ms"):
        SandboxProvider(config(latency_ms="soon"), redis_client, "p")
    with pytest.raises(ConfigError, match="latency_ms"):
        SandboxProvider(config(latency_ms="-1"), redis_client, "p")
    with pytest.raises(ConfigError, match="kind 'ses'"):
        build_provider(config(kind="ses"), redis=redis_client, prefix="p")
