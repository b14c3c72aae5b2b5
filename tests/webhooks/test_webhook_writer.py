"""The event writer batches concurrent requests, and one bad request fails alone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
import pytest

from sluice.ingest.webhooks import repository
from sluice.ingest.webhooks.errors import WebhookRejected
from sluice.ingest.webhooks.events import DeliveryEvent
from sluice.ingest.webhooks.parse import parse_sendgrid
from sluice.ingest.webhooks.writer import EventWriter
from tests.webhooks.payloads import sendgrid_body, sendgrid_event


def _event(event_id: str, raw: object) -> DeliveryEvent:
    return DeliveryEvent(
        source="sendgrid",
        event_id=event_id,
        type="delivered",
        occurred_at=datetime.now(UTC),
        provider_message_id=None,
        intent_id=None,
        recipient="a@example.com",
        raw=raw,
    )


async def test_a_request_the_database_refuses_does_not_fail_its_batch(
    pg_pool: asyncpg.Pool,
) -> None:
    calls: list[int] = []

    async def record(events: Sequence[DeliveryEvent]) -> repository.RecordResult:
        calls.append(len(events))
        return await repository.record(pg_pool, events, soft_bounce_limit=3, soft_bounce_window=60)

    writer = EventWriter(record)
    good = writer.write([_event("good", {"ok": 1})])
    bad = writer.write([_event("bad", object())])  # not JSON: record() raises TypeError
    task = asyncio.create_task(writer.run())
    try:
        results = await asyncio.gather(good, bad, return_exceptions=True)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert calls == [2, 1, 1]  # one batch of both, then each alone
    assert isinstance(results[0], repository.RecordResult)
    assert results[0].stored == 1
    assert isinstance(results[1], TypeError)
    assert await pg_pool.fetchval("SELECT event_id FROM delivery_events") == "good"
    assert await pg_pool.fetchval("SELECT count(*) FROM delivery_event_keys") == 1


def test_timestamps_out_of_any_calendar_do_not_break_parsing() -> None:
    item = sendgrid_event("delivered", "x", "a@example.com")
    item["timestamp"] = 10**20
    [event] = parse_sendgrid(sendgrid_body([item]))
    assert abs((event.occurred_at - datetime.now(UTC)).total_seconds()) < 60


@pytest.mark.parametrize("body", [b"{}", b"[1]", b'[{"event": "delivered"}]', b"\xff"])
def test_malformed_sendgrid_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(WebhookRejected) as exc:
        parse_sendgrid(body)
    assert exc.value.status == 400
