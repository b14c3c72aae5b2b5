"""Fixtures for the catalogue tests: the real ingest server on port 0, and stubs for each of
its services over one real loopback channel (not collected: no test_ prefix)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, timedelta

import asyncpg
import grpc
import pytest

from sluice.common.telemetry import disabled
from sluice.ingest import app
from sluice.ingest.settings import IngestSettings
from sluice.v1 import (
    ingest_pb2_grpc,
    intent_pb2,
    suppression_pb2_grpc,
    template_pb2,
    template_pb2_grpc,
)


@dataclass
class Stubs:
    ingest: ingest_pb2_grpc.IngestServiceStub
    templates: template_pb2_grpc.TemplateServiceStub
    suppressions: suppression_pb2_grpc.SuppressionServiceStub
    port: int


def settings_for(pg_dsn: str, **overrides: object) -> IngestSettings:
    return IngestSettings(database_url=pg_dsn, db_pool_size=4, **overrides)  # type: ignore[arg-type]


@pytest.fixture
async def stubs(pg_dsn: str, pg_pool: asyncpg.Pool) -> AsyncIterator[Stubs]:
    async with (
        app.running(settings_for(pg_dsn), disabled(), port=0) as handle,
        grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel,
    ):
        yield Stubs(
            ingest=ingest_pb2_grpc.IngestServiceStub(channel),
            templates=template_pb2_grpc.TemplateServiceStub(channel),
            suppressions=suppression_pb2_grpc.SuppressionServiceStub(channel),
            port=handle.port,
        )


def welcome(**overrides: object) -> template_pb2.CreateTemplateRequest:
    fields: dict[str, object] = {
        "template_id": "welcome",
        "subject": "Hi {{ name }}",
        "html_body": "<p>Hi {{ name }}</p>",
        "text_body": "Hi {{ name }}",
        "variables": ["name"],
        "from_address": "Sluice <noreply@example.com>",
    }
    fields.update(overrides)
    return template_pb2.CreateTemplateRequest(**fields)  # type: ignore[arg-type]


def submission(key: str, **overrides: object) -> intent_pb2.IntentSubmission:
    fields: dict[str, object] = {
        "idempotency_key": key,
        "campaign_id": "spring",
        "recipient": "alice@example.com",
        "intent": intent_pb2.INTENT_MARKETING,
        "template_id": "welcome",
        "variables": {"name": "Alice"},
    }
    fields.update(overrides)
    return intent_pb2.IntentSubmission(**fields)  # type: ignore[arg-type]


def next_berlin_spring_forward() -> date:
    """The next day Europe/Berlin skips 02:00-03:00 (the last Sunday of March), at least two
    days ahead, so a test's send_at there is always in the future and within a year."""
    year = date.today().year
    while True:
        last = date(year, 3, 31)
        day = last - timedelta(days=(last.weekday() - 6) % 7)
        if day > date.today() + timedelta(days=2):
            return day
        year += 1
