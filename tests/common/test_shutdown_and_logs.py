"""Bounded shutdown (NOT_SERVING first, in-flight calls drain) and recipient redaction."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.common.logging import ContextFilter, JsonFormatter, redact_email
from sluice.common.telemetry import disabled
from sluice.sender import app
from sluice.sender.settings import SenderSettings
from sluice.v1 import sender_pb2, sender_pb2_grpc
from tests.conftest import REDIS_URL

SLOW_PROVIDER = """
[[providers]]
name = "slow"
kind = "sandbox"
cost_per_thousand = 0.1
intents = ["marketing"]
[providers.settings]
latency_ms = 800
"""

TEMPLATE = sender_pb2.TemplateContent(
    id="t",
    version=1,
    subject="Hi",
    html_body="<p>Hi</p>",
    text_body="Hi",
    from_address="a@b.example",
)


def settings_for(tmp_path: Path, redis_prefix: str) -> SenderSettings:
    providers = tmp_path / "providers.toml"
    providers.write_text(SLOW_PROVIDER)
    return SenderSettings(
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        providers_file=str(providers),
        shutdown_grace_seconds=5.0,
    )


async def test_shutdown_goes_not_serving_first_and_drains_in_flight_calls(
    tmp_path: Path, redis_prefix: str
) -> None:
    async with app.running(settings_for(tmp_path, redis_prefix), disabled(), port=0) as handle:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
        sender = sender_pb2_grpc.SenderServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="sluice.v1.SenderService"))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        in_flight = asyncio.ensure_future(
            sender.SendBatch(
                sender_pb2.SendBatchRequest(
                    provider="slow",
                    template=TEMPLATE,
                    messages=[
                        sender_pb2.OutboundMessage(intent_id="i1", recipient="a@example.com")
                    ],
                )
            )
        )
        await asyncio.sleep(0.2)  # the call is inside the provider's 800 ms latency now
        stopping = asyncio.ensure_future(handle.stop(5.0))
        # Health changes before the server stops accepting: probes move away first.
        second = await asyncio.wait_for(watch.read(), timeout=2)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open stream would hold the drain until the grace period ends
        assert not in_flight.done()
        reply = await asyncio.wait_for(in_flight, timeout=5)
        assert reply.results[0].outcome == sender_pb2.SEND_OUTCOME_ACCEPTED
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await sender.GetCapacity(sender_pb2.GetCapacityRequest(), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        await channel.close()


async def test_recipients_never_reach_the_logs_in_clear(
    tmp_path: Path, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path, redis_prefix)
    caplog.set_level(logging.DEBUG)
    async with (
        app.running(settings, disabled(), port=0) as handle,
        grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel,
    ):
        reply = await sender_pb2_grpc.SenderServiceStub(channel).SendBatch(
            sender_pb2.SendBatchRequest(
                provider="slow",
                template=TEMPLATE,
                messages=[
                    sender_pb2.OutboundMessage(
                        intent_id="i1", recipient="secret.person@fail.sandbox.example"
                    )
                ],
            )
        )
    assert reply.results[0].outcome == sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records]
    assert any(redact_email("secret.person@fail.sandbox.example") in line for line in lines)
    assert not any("secret.person" in line for line in lines)


def test_redaction_keeps_domain_hides_local_part_and_is_stable() -> None:
    redacted = redact_email("Alice.Smith@example.com")
    assert redacted.endswith("@example.com")
    assert "alice" not in redacted.lower()
    assert redacted == redact_email("Alice.Smith@example.com")
    assert redacted != redact_email("bob@example.com")
    assert "@" not in redact_email("no-at-sign")


async def test_log_records_carry_the_callers_request_id(
    tmp_path: Path, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(ContextFilter())
    caplog.set_level(logging.INFO)
    async with (
        app.running(settings_for(tmp_path, redis_prefix), disabled(), port=0) as handle,
        grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel,
    ):
        await sender_pb2_grpc.SenderServiceStub(channel).SendBatch(
            sender_pb2.SendBatchRequest(
                provider="slow",
                template=TEMPLATE,
                messages=[
                    sender_pb2.OutboundMessage(intent_id="i1", recipient="x@fail.sandbox.example")
                ],
            ),
            metadata=(("x-request-id", "req-abc123"),),
        )
    failures = [r for r in caplog.records if r.getMessage() == "permanent failure"]
    assert failures
    line = JsonFormatter().format(failures[0])
    assert '"request_id": "req-abc123"' in line
