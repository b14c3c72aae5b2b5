"""Test double of the SenderService (a real grpc.aio server on port 0) with scripted outcomes,
and helpers to seed and read intents. Not collected: no test_ prefix.

The outcome of each message is chosen by its recipient's local part prefix:
``ok`` accepted, ``throttle`` throttled (retry-after 30 s), ``transient`` transient failure,
``permanent`` permanent failure, ``noresult`` no result at all; ``force`` overrides them
all. ``fail_providers`` makes
every message to those providers a transient failure; ``abort`` fails whole calls with a
gRPC status; ``delay`` holds each call; ``block`` holds calls until it is set.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc

from sluice.common.providers import ProviderConfig
from sluice.ingest.repository import NewIntent, insert_intents
from sluice.v1 import sender_pb2, sender_pb2_grpc
from tests.db.db_factories import new_intent

THROTTLE_RETRY_AFTER = 30

PROVIDERS: tuple[ProviderConfig, ...] = (
    ProviderConfig(
        name="cheap",
        kind="sandbox",
        cost_per_thousand=0.10,
        sustained_rate=0,
        burst=0,
        intents=frozenset({"marketing", "digest"}),
    ),
    ProviderConfig(
        name="dear",
        kind="sandbox",
        cost_per_thousand=0.30,
        sustained_rate=0,
        burst=0,
        intents=frozenset({"marketing"}),
    ),
    ProviderConfig(
        name="off",
        kind="sandbox",
        cost_per_thousand=0.01,
        sustained_rate=0,
        burst=0,
        intents=frozenset({"marketing", "transactional"}),
        enabled=False,
    ),
)


@dataclass
class Call:
    provider: str
    template: sender_pb2.TemplateContent
    messages: list[sender_pb2.OutboundMessage]
    metadata: dict[str, str]


@dataclass
class FakeSender(sender_pb2_grpc.SenderServiceServicer):
    calls: list[Call] = field(default_factory=list)
    fail_providers: set[str] = field(default_factory=set)
    abort: grpc.StatusCode | None = None
    delay: float = 0.0
    reverse: bool = False
    block: asyncio.Event | None = None
    # only calls for this template wait for ``block`` (None: every call does)
    block_template: str | None = None
    received: asyncio.Event = field(default_factory=asyncio.Event)
    # outcomes forced for every message of every call (e.g. SEND_OUTCOME_UNKNOWN)
    force: sender_pb2.SendOutcome.ValueType | None = None
    capacity_down: bool = False
    # GetCapacity calls: how often a router probed this sender
    probes: int = 0

    def sent(self) -> list[sender_pb2.OutboundMessage]:
        return [m for c in self.calls for m in c.messages]

    async def SendBatch(
        self, request: sender_pb2.SendBatchRequest, context: grpc.aio.ServicerContext
    ) -> sender_pb2.SendBatchResponse:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.calls.append(
            Call(request.provider, request.template, list(request.messages), metadata)
        )
        self.received.set()
        if self.block is not None and self.block_template in (None, request.template.id):
            await self.block.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.abort is not None:
            await context.abort(self.abort, "scripted failure")
        results = []
        for m in request.messages:
            r = self._result(request.provider, m)
            if r is not None:
                results.append(r)
        if self.reverse:
            results.reverse()
        return sender_pb2.SendBatchResponse(results=results)

    def _result(self, provider: str, m: sender_pb2.OutboundMessage) -> sender_pb2.SendResult | None:
        local = m.recipient.partition("@")[0]
        r = sender_pb2.SendResult(intent_id=m.intent_id)
        if self.force is not None:
            r.outcome = self.force
            r.reason = "forced"
        elif provider in self.fail_providers or local.startswith("transient"):
            r.outcome = sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE
            r.reason = f"{provider} answered 503"
        elif local.startswith("ok"):
            r.outcome = sender_pb2.SEND_OUTCOME_ACCEPTED
            r.provider_message_id = f"{provider}-{m.intent_id}"
        elif local.startswith("throttle"):
            r.outcome = sender_pb2.SEND_OUTCOME_THROTTLED
            r.retry_after.seconds = THROTTLE_RETRY_AFTER
        elif local.startswith("permanent"):
            r.outcome = sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE
            r.reason = "mailbox does not exist"
        elif local.startswith("noresult"):
            return None
        else:
            raise AssertionError(f"unscripted recipient {m.recipient}")
        return r

    async def GetCapacity(
        self, request: sender_pb2.GetCapacityRequest, context: grpc.aio.ServicerContext
    ) -> sender_pb2.GetCapacityResponse:
        self.probes += 1
        if self.capacity_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "redis down")
        return sender_pb2.GetCapacityResponse()


async def serve_fake(fake: FakeSender) -> AsyncIterator[int]:
    """Runs ``fake`` on a real gRPC server on port 0; yields the port."""
    server = grpc.aio.server()
    sender_pb2_grpc.add_SenderServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        if fake.block is not None:
            fake.block.set()
        await server.stop(0)


async def seed(
    pool: asyncpg.Pool,
    recipients: Sequence[str],
    *,
    kind: str = "marketing",
    template_id: str = "welcome",
    deadline: timedelta = timedelta(hours=6),
    send_at: datetime | None = None,
    traceparent: str | None = None,
    campaign_id: str = "spring",
) -> list[uuid.UUID]:
    """Stores one due intent per recipient (through ingest's repository); returns their ids."""
    rows: list[NewIntent] = [
        new_intent(
            f"k-{uuid.uuid4().hex}",
            kind=kind,
            recipient=r,
            template_id=template_id,
            deadline=deadline,
            send_at=send_at,
            traceparent=traceparent,
            campaign_id=campaign_id,
        )
        for r in recipients
    ]
    outcomes = await insert_intents(pool, rows)
    assert all(o.created for o in outcomes)
    return [r.id for r in rows]


async def rows(pool: asyncpg.Pool, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, asyncpg.Record]:
    records = await pool.fetch(
        "SELECT id, status::text AS status, provider, provider_message_id, attempts, last_error,"
        " due_at, lease_id, now() AS now FROM intents WHERE id = ANY($1::uuid[])",
        list(ids),
    )
    return {r["id"]: r for r in records}


def long_ago() -> datetime:
    return datetime.now(UTC) - timedelta(hours=2)
