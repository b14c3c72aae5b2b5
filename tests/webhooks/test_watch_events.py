"""GetIntent's event history and WatchIntentEvents, over real gRPC, fed by real webhooks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from sluice.common.telemetry import disabled
from sluice.ingest import app
from sluice.ingest.settings import IngestSettings
from sluice.v1 import events_pb2, ingest_pb2, ingest_pb2_grpc, intent_pb2
from tests.webhooks.conftest import Hooks, sent_intents
from tests.webhooks.payloads import sendgrid_body, sendgrid_event


@pytest.fixture
async def stub(pg_dsn: str, hooks: Hooks) -> AsyncIterator[ingest_pb2_grpc.IngestServiceStub]:
    settings = IngestSettings(database_url=pg_dsn, db_pool_size=4, webhook_port=-1)
    async with (
        app.running(settings, disabled(), port=0) as handle,
        grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel,
    ):
        yield ingest_pb2_grpc.IngestServiceStub(channel)


async def post(hooks: Hooks, events: list[dict[str, object]]) -> None:
    body = sendgrid_body(events)
    assert await hooks.post("/webhooks/sendgrid", body, hooks.keys.sendgrid_headers(body)) == 200


async def test_get_intent_shows_the_event_history(
    hooks: Hooks, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    [(intent_id, recipient, message_id)] = await sent_intents(hooks.pool, 1)
    await post(hooks, [sendgrid_event("delivered", message_id, recipient)])
    await post(hooks, [sendgrid_event("spamreport", message_id, recipient)])
    response = await stub.GetIntent(ingest_pb2.GetIntentRequest(id=str(intent_id)))
    assert response.intent.status == intent_pb2.INTENT_STATUS_COMPLAINED
    assert [e.type for e in response.events] == [
        events_pb2.DELIVERY_EVENT_TYPE_DELIVERED,
        events_pb2.DELIVERY_EVENT_TYPE_COMPLAINED,
    ]
    assert all(e.provider == "sendgrid" and e.receive_time.seconds for e in response.events)
    assert response.events[0].intent == intent_pb2.INTENT_MARKETING


async def test_watcher_sees_a_bounce_within_a_second_and_resumes_without_loss(
    hooks: Hooks, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    intents = await sent_intents(hooks.pool, 8, campaign="watched")
    others = await sent_intents(hooks.pool, 2, campaign="other")
    request = ingest_pb2.WatchIntentEventsRequest(
        campaign_id="watched", types=[events_pb2.DELIVERY_EVENT_TYPE_BOUNCED], after_cursor="0"
    )
    call = stub.WatchIntentEvents(request)
    first = intents[0]
    await asyncio.sleep(0.2)  # the stream is waiting for events
    await post(hooks, [sendgrid_event("bounce", first[2], first[1])])
    posted = time.monotonic()
    got = await asyncio.wait_for(call.read(), 5)
    assert time.monotonic() - posted < 1.0
    assert isinstance(got, ingest_pb2.WatchIntentEventsResponse)
    assert got.event.intent_id == str(first[0])
    cursor = got.event.cursor
    call.cancel()

    # While nobody watches: more bounces (and events the filter excludes).
    await post(hooks, [sendgrid_event("bounce", m, r) for _, r, m in intents[1:]])
    await post(hooks, [sendgrid_event("bounce", m, r) for _, r, m in others])
    await post(hooks, [sendgrid_event("delivered", m, r) for _, r, m in intents[1:]])

    resumed = stub.WatchIntentEvents(
        ingest_pb2.WatchIntentEventsRequest(
            campaign_id="watched",
            types=[events_pb2.DELIVERY_EVENT_TYPE_BOUNCED],
            after_cursor=cursor,
        )
    )
    seen = []
    for _ in range(len(intents) - 1):
        response = await asyncio.wait_for(resumed.read(), 5)
        assert isinstance(response, ingest_pb2.WatchIntentEventsResponse)
        seen.append(response.event.intent_id)
    assert sorted(seen) == sorted(str(i) for i, _, _ in intents[1:])
    # nothing else is pending for this filter
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(resumed.read(), 1.5)
    resumed.cancel()


async def test_watch_refuses_a_bad_cursor(
    hooks: Hooks, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    call = stub.WatchIntentEvents(ingest_pb2.WatchIntentEventsRequest(after_cursor="abc"))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call.read()
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
