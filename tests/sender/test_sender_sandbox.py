"""The sandbox provider against real Redis: outcomes by domain, and the shared ledger."""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sluice.common.errors import ConfigError, Unavailable
from sluice.common.providers import ProviderConfig, SandboxSettings
from sluice.sender.providers import (
    EmailProvider,
    OutboundEmail,
    SandboxLedger,
    SandboxProvider,
    build_adapters,
)


def config(name: str = "ses", **settings: Any) -> ProviderConfig:
    return ProviderConfig(
        name=name,
        kind="sandbox",
        cost_per_thousand=0.1,
        sustained_rate=14,
        burst=30,
        intents=frozenset({"marketing"}),
        settings=SandboxSettings(**settings),
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
    async with AsyncExitStack() as stack:
        adapters = await build_adapters([config()], stack, redis=redis_client, prefix=redis_prefix)
    provider = adapters["ses"]
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


async def test_options_change_domains_latency_and_id_recording(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    provider = SandboxProvider(
        config(
            name="resend",
            fail_domains=("bad.test", "worse.test"),
            flaky_domains=(),
            latency_ms=50.0,
            record_ids=False,
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


async def test_injection_and_keep_last(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    throttling = SandboxProvider(
        config(throttle_rate=1.0, throttle_retry_after=2.5), redis_client, redis_prefix
    )
    [r] = await throttling.send_batch([email("t", "x@example.com")])
    assert (r.outcome, r.retry_after) == ("throttled", 2.5)
    unknown = SandboxProvider(config(unknown_rate=1.0), redis_client, redis_prefix)
    assert [r.outcome for r in await unknown.send_batch([email("u", "x@example.com")])] == [
        "unknown"
    ]
    failing = SandboxProvider(config(failure_rate=1.0), redis_client, redis_prefix)
    assert (await failing.send_batch([email("f", "x@example.com")]))[0].outcome == "transient"
    # Its own rate: 2 per second, so of 5 at once the first 2 pass and the rest are throttled.
    limited = SandboxProvider(config(rate=2.0, keep_last=3), redis_client, redis_prefix)
    results = await limited.send_batch([email(f"r{i}", "x@example.com") for i in range(5)])
    assert [r.outcome for r in results] == ["accepted"] * 2 + ["throttled"] * 3
    assert all(r.retry_after == 0.5 for r in results[2:])
    assert [m.intent_id for m in limited.recent()] == ["r2", "r3", "r4"]
    assert limited.recent()[0].html == "<p>h</p>"
    assert SandboxProvider(config(), redis_client, redis_prefix).recent() == []
    assert await SandboxLedger(redis_client, redis_prefix).sent_count("ses") == 2


def test_settings_are_typed_and_checked() -> None:
    with pytest.raises(ConfigError, match="latency_ms"):
        SandboxSettings(latency_ms=-1.0).check("p")
    with pytest.raises(ConfigError, match="add up past 1"):
        SandboxSettings(failure_rate=0.6, throttle_rate=0.6).check("p")
    with pytest.raises(ConfigError, match="needs SesSettings"):
        ProviderConfig("x", "ses", 0.1, 0, 0, frozenset({"marketing"}))


def test_every_kind_has_a_factory_and_only_configured_kinds_are_imported() -> None:
    import subprocess
    import sys

    from sluice.common.providers import PROVIDER_KINDS
    from sluice.sender.providers import factory

    assert all(callable(factory(kind)) for kind in PROVIDER_KINDS)
    # A sandbox-only sender never imports aioboto3 (seconds of start-up on a loaded box).
    probe = "import sys, sluice.sender.app; print('aioboto3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
