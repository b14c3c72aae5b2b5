"""A running webhook endpoint on a test database, with test keys for every provider."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from sluice.ingest.repository import NewIntent, insert_intents
from sluice.ingest.settings import IngestSettings
from sluice.ingest.webhooks import endpoint
from sluice.ingest.webhooks.metrics import WebhookMetrics
from tests.webhooks.webhook_keys import TOPIC, CertServer, ProviderKeys

UNSUBSCRIBE_SECRET = "u" * 40


@pytest.fixture(scope="session")
def keys() -> ProviderKeys:
    return ProviderKeys()


@dataclass
class Hooks:
    """What a webhook test talks to."""

    url: str
    http: aiohttp.ClientSession
    pool: asyncpg.Pool
    keys: ProviderKeys
    certs: CertServer
    metrics: WebhookMetrics
    registry: CollectorRegistry
    endpoint: endpoint.WebhookEndpoint

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        async with self.http.post(self.url + path, data=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    def count(self, source: str, outcome: str) -> float:
        value = self.registry.get_sample_value(
            "sluice_webhook_requests_total", {"source": source, "outcome": outcome}
        )
        return value or 0.0


def webhook_settings(pg_dsn: str, keys: ProviderKeys, **overrides: Any) -> IngestSettings:
    settings = IngestSettings(
        database_url=pg_dsn,
        ses_topic_arns=TOPIC,
        resend_webhook_secret=keys.svix_secret,
        sendgrid_webhook_public_key=keys.sendgrid_public,
        unsubscribe_secret=UNSUBSCRIBE_SECRET,
        guard_check_seconds=3600,  # tests run maintenance rounds themselves
    )
    return replace(settings, **overrides)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def hooks(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    keys: ProviderKeys,
    insert_template: Any,
    settings_overrides: dict[str, Any],
) -> AsyncIterator[Hooks]:
    await insert_template()
    registry = CollectorRegistry()
    settings = webhook_settings(pg_dsn, keys, **settings_overrides)
    settings.validate()
    async with CertServer(keys) as certs:
        trust = endpoint.SnsTrust(
            cert_host=re.compile("localhost"), cert_port=certs.port, ssl_context=keys.client_ssl()
        )
        async with (
            endpoint.running(pg_pool, settings, registry=registry, sns_trust=trust) as ep,
            aiohttp.ClientSession() as http,
        ):
            yield Hooks(
                f"http://127.0.0.1:{ep.port}", http, pg_pool, keys, certs, ep.metrics, registry, ep
            )


async def sent_intents(
    pool: asyncpg.Pool,
    count: int,
    *,
    provider: str = "sendgrid",
    kind: str = "marketing",
    campaign: str = "spring",
    status: str = "sent",
    recipient: str | None = None,
) -> list[tuple[uuid.UUID, str, str]]:
    """``count`` intents already accepted by ``provider``: (id, recipient, message id)."""
    now = datetime.now(UTC) - timedelta(minutes=1)
    rows = [
        NewIntent(
            id=uuid.uuid4(),
            idempotency_key=f"k-{uuid.uuid4().hex}",
            payload_hash=b"p",
            campaign_id=campaign,
            recipient=recipient or f"user{i}-{uuid.uuid4().hex[:6]}@example.com",
            kind=kind,
            priority={"transactional": 0, "digest": 1, "marketing": 2}[kind],
            template_id="welcome",
            variables={"name": "A"},
            send_at=now,
            deadline=now + timedelta(hours=6),
            traceparent=None,
        )
        for i in range(count)
    ]
    await insert_intents(pool, rows)
    out = []
    for row in rows:
        message_id = f"{provider}-{uuid.uuid4().hex[:20]}"
        if status != "pending":
            await pool.execute(
                "UPDATE intents SET status = $2::intent_status, provider = $3,"
                " provider_message_id = $4,"
                " lease_id = CASE WHEN $2 = 'leased' THEN gen_random_uuid() END,"
                " lease_expires_at = CASE WHEN $2 = 'leased' THEN now() + interval '1 min' END"
                " WHERE id = $1",
                row.id,
                status,
                provider,
                message_id if status != "leased" else None,
            )
        out.append((row.id, row.recipient, message_id))
    return out


async def snapshot(pool: asyncpg.Pool) -> tuple[Any, ...]:
    """Everything a webhook could change."""
    return tuple(
        await pool.fetchrow(
            "SELECT (SELECT count(*) FROM delivery_events) AS events,"
            " (SELECT count(*) FROM delivery_event_keys) AS keys,"
            " (SELECT count(*) FROM suppressions) AS suppressions,"
            " (SELECT count(*) FROM provider_event_counts) AS counts,"
            " (SELECT array_agg(status::text || updated_at::text ORDER BY id) FROM intents)"
            " AS intents"
        )
    )


async def status_of(pool: asyncpg.Pool, intent_id: uuid.UUID) -> str:
    return str(await pool.fetchval("SELECT status::text FROM intents WHERE id = $1", intent_id))
