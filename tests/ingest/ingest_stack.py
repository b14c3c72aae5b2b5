"""A real ingest server on port 0 over a real PostgreSQL database, for ingest's tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc

from sluice.common.telemetry import disabled
from sluice.ingest import app
from sluice.ingest.repository import TemplateRow, upsert_template
from sluice.ingest.settings import IngestSettings
from sluice.v1 import ingest_pb2_grpc, intent_pb2

WELCOME = TemplateRow(
    id="welcome",
    version=1,
    subject="Hi {{ name }}",
    html_body="<p>Hi {{ name }}</p><p>{{ footer }}</p>",
    text_body="Hi {{ name }}\n{{ footer }}",
    variables=("name", "footer"),
    from_address="noreply@example.com",
)


@dataclass
class Ingest:
    stub: ingest_pb2_grpc.IngestServiceStub
    channel: grpc.aio.Channel
    port: int


@contextlib.asynccontextmanager
async def running_ingest(
    pg_dsn: str, pg_pool: asyncpg.Pool, **settings: Any
) -> AsyncIterator[Ingest]:
    """Ingest with the ``welcome`` template stored and ``settings`` applied."""
    await upsert_template(pg_pool, WELCOME)
    # Lag and backlog shedding off unless a test asks: a loaded test machine lags on its
    # own, and a burst from a client sharing the server's loop waits in gRPC core by design.
    settings.setdefault("ingest_max_loop_lag_seconds", 0.0)
    settings.setdefault("ingest_max_waiting_calls", 0)
    config = IngestSettings(database_url=pg_dsn, db_pool_size=4, **settings)
    async with (
        app.running(config, disabled(), port=0) as handle,
        grpc.aio.insecure_channel(
            f"127.0.0.1:{handle.port}",
            options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
        ) as channel,
    ):
        yield Ingest(ingest_pb2_grpc.IngestServiceStub(channel), channel, handle.port)


def submission(key: str = "k", **overrides: object) -> intent_pb2.IntentSubmission:
    fields: dict[str, object] = {
        "idempotency_key": key,
        "campaign_id": "spring",
        "recipient": "alice@example.com",
        "intent": intent_pb2.INTENT_MARKETING,
        "template_id": "welcome",
        "variables": {"name": "Alice", "footer": "Bye"},
    }
    fields.update(overrides)
    return intent_pb2.IntentSubmission(**fields)  # type: ignore[arg-type]


async def count_intents(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM intents"))
