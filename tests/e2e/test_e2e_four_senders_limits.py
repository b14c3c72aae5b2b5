"""Promise 4 at length: four sender processes share one provider's limits for 30 s.

Four ``sluice serve sender`` processes (same Redis, same key prefix, same providers file)
are hammered by clients acting as routers with a permanent backlog. The sandbox provider
stamps every call it receives with the sender's clock ("<unix_us>:<count>" per call): the
provider's own view. Two limits are checked, each with its own provider:

- messages: 50/s sustained, burst 100: no one-second window of the provider's view holds
  more than 100 messages, and it receives at least 98% of burst + 50/s x the run;
- requests: 5 requests/s, request burst 10, batches of 20 messages (one request each): no
  one-second window holds more than 10 calls, and at least 98% of 10 + 5/s x the run arrive.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from sluice.sender.providers.sandbox import SandboxLedger
from sluice.v1 import sender_pb2, sender_pb2_grpc
from tests.e2e.e2e_stack import ServiceProcess, service_stack
from tests.e2e.test_e2e_two_senders import max_in_any_window

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SENDERS = 4
CLIENTS_PER_SENDER = 3
SECONDS = 30.0
MESSAGES_PER_CALL = 20
MAX_PAUSE = 0.1
MIN_PAUSE = 0.005
MIN_USE = 0.98

TEMPLATE = sender_pb2.TemplateContent(
    id="t",
    version=1,
    subject="Hi {{ name }}",
    html_body="<p>Hi {{ name }}</p>",
    text_body="Hi {{ name }}",
    variables=["name"],
    from_address="noreply@example.com",
)


def providers_toml(name: str, limits: str) -> str:
    return f"""
[[providers]]
name = "{name}"
kind = "sandbox"
cost_per_thousand = 0.1
intents = ["marketing"]
max_batch_size = 50
{limits}
settings = {{ record_ids = false }}
"""


async def hammer(
    sender: ServiceProcess, provider: str, until: float, ids: itertools.count[int]
) -> int:
    """SendBatch after SendBatch until ``until``; waits the retry-after (bounded) when
    throttled. Returns how many messages were accepted."""
    accepted = 0
    async with grpc.aio.insecure_channel(sender.target) as channel:
        stub = sender_pb2_grpc.SenderServiceStub(channel)
        while time.monotonic() < until:
            messages = [
                sender_pb2.OutboundMessage(
                    intent_id=f"i-{n}",
                    recipient=f"user{n}@example.com",
                    variables={"name": str(n)},
                    idempotency_key=f"k-{n}",
                )
                for n in (next(ids) for _ in range(MESSAGES_PER_CALL))
            ]
            answer = await stub.SendBatch(
                sender_pb2.SendBatchRequest(
                    provider=provider, template=TEMPLATE, messages=messages
                ),
                timeout=10,
            )
            pause: float | None = None
            for result in answer.results:
                if result.outcome == sender_pb2.SEND_OUTCOME_ACCEPTED:
                    accepted += 1
                else:
                    assert result.outcome == sender_pb2.SEND_OUTCOME_THROTTLED, result
                    retry = result.retry_after.ToTimedelta().total_seconds()
                    assert retry > 0, result
                    pause = retry if pause is None else min(pause, retry)
            if pause is not None:
                await asyncio.sleep(min(max(pause, MIN_PAUSE), MAX_PAUSE))
    return accepted


async def run_four_senders(
    provider: str, limits: str, redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> tuple[list[tuple[int, int]], int]:
    """Hammers the provider through four senders; returns its call log and accepted total."""
    async with service_stack(
        database_url="",
        redis_prefix=redis_prefix,
        log_dir=tmp_path,
        providers_toml=providers_toml(provider, limits),
        SLUICE_RENDER_WORKERS="1",
    ) as stack:
        # One at a time: four Python start-ups at once can take the 2-core box past the
        # stack's 30 s SERVING deadline when other suites run too.
        for i in range(SENDERS):
            await stack.start("sender", name=f"sender-{i}")
        senders = [p for p in stack.processes if p.service == "sender"]
        ids = itertools.count()
        until = time.monotonic() + SECONDS
        accepted = await asyncio.gather(
            *(
                hammer(sender, provider, until, ids)
                for sender in senders
                for _ in range(CLIENTS_PER_SENDER)
            )
        )
    log = await SandboxLedger(redis_client, redis_prefix).send_log(provider)
    return log, sum(accepted)


def span_seconds(log: list[tuple[int, int]]) -> float:
    return (max(t for t, _ in log) - min(t for t, _ in log)) / 1e6


async def test_four_senders_hold_50_per_second_burst_100(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    rate, burst = 50, 100
    log, accepted = await run_four_senders(
        "msgs", f"sustained_rate = {rate}\nburst = {burst}", redis_prefix, redis_client, tmp_path
    )
    total = sum(n for _, n in log)
    assert total == accepted
    most, at_us = max_in_any_window(log, 1_000_000)
    assert most <= burst, f"{most} messages in the second from {at_us} µs (burst {burst})"
    allowed = burst + rate * span_seconds(log)
    assert total <= allowed + rate * 0.1, (total, allowed)
    assert total >= MIN_USE * allowed, f"{total} of {allowed:.0f} allowed ({total / allowed:.1%})"


async def test_four_senders_hold_5_requests_per_second_burst_10(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    rps, request_burst = 5, 10
    log, accepted = await run_four_senders(
        "reqs",
        f"requests_per_second = {rps}\nrequest_burst = {request_burst}",
        redis_prefix,
        redis_client,
        tmp_path,
    )
    # Each SendBatch of 20 is one provider call (max_batch_size 50): whole batches only.
    assert {n for _, n in log} == {MESSAGES_PER_CALL}
    assert sum(n for _, n in log) == accepted
    calls = [(t, 1) for t, _ in log]
    most, at_us = max_in_any_window(calls, 1_000_000)
    assert most <= request_burst, f"{most} calls in the second from {at_us} µs"
    allowed = request_burst + rps * span_seconds(calls)
    assert len(calls) <= allowed + rps * 0.1, (len(calls), allowed)
    assert len(calls) >= MIN_USE * allowed, f"{len(calls)} of {allowed:.0f} allowed"
