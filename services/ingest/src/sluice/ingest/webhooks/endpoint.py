"""The webhook endpoint as parts of ingest's Service: an HTTP listener, the event writer
and the maintenance loop (both supervised tasks).

:func:`build` makes the parts, :func:`attach` adds them to a Service: the listener drains
in-flight requests on stop, and only then are the writer and the maintenance loop
cancelled, so a request being stored is answered. :func:`running` runs the endpoint alone
in a Service of its own (tests, tools).
"""

from __future__ import annotations

import contextlib
import re
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import asyncpg
from prometheus_client import CollectorRegistry

from sluice.common.http import HttpListener
from sluice.common.service import Service
from sluice.ingest.webhooks import maintenance, repository
from sluice.ingest.webhooks.app import Clock, Webhooks, build_app
from sluice.ingest.webhooks.config import WebhookConfig, from_settings
from sluice.ingest.webhooks.metrics import WebhookMetrics
from sluice.ingest.webhooks.sns import SNS_HOST, SnsVerifier
from sluice.ingest.webhooks.writer import EventWriter


@dataclass(frozen=True)
class SnsTrust:
    """Where SNS certificates may come from. Production: the defaults. A test points these at
    a local HTTPS server it trusts; no environment variable can."""

    cert_host: re.Pattern[str] = SNS_HOST
    cert_port: int | None = None
    ssl_context: ssl.SSLContext | None = None


@dataclass
class WebhookEndpoint:
    """The endpoint's parts."""

    listener: HttpListener
    hooks: Webhooks
    writer: EventWriter
    config: WebhookConfig
    metrics: WebhookMetrics

    @property
    def port(self) -> int:
        """The bound HTTP port."""
        return self.listener.port


@contextlib.asynccontextmanager
async def http_client() -> AsyncIterator[aiohttp.ClientSession]:
    """The HTTPS client the endpoint uses to fetch SNS certificates."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def build(
    pool: asyncpg.Pool,
    settings: object,
    http: aiohttp.ClientSession | None,
    registry: CollectorRegistry,
    *,
    port: int,
    host: str | None = None,
    sns_trust: SnsTrust | None = None,
    clock: Clock = time.time,
) -> WebhookEndpoint:
    """The endpoint for IngestSettings ``settings`` (not started). Without ``http`` the SES
    path answers 404 (it cannot fetch certificates)."""
    config = from_settings(settings)
    metrics = WebhookMetrics(registry)
    trust = SnsTrust() if sns_trust is None else sns_trust
    writer = EventWriter(
        lambda events: repository.record(
            pool,
            events,
            soft_bounce_limit=config.soft_bounce_limit,
            soft_bounce_window=config.soft_bounce_window,
        )
    )
    sns = None
    if http is not None:
        sns = SnsVerifier(
            topics=config.ses_topics,
            session=http,
            max_age=config.sns_max_age,
            cert_host=trust.cert_host,
            cert_port=trust.cert_port,
            ssl_context=trust.ssl_context,
        )
    hooks = Webhooks(pool, config, writer, metrics, sns, clock)
    listen_host = host if host is not None else str(getattr(settings, "listen_host", "127.0.0.1"))
    listener = HttpListener("webhooks", build_app(hooks), listen_host, port)
    hooks.health = listener.health
    return WebhookEndpoint(listener, hooks, writer, config, metrics)


def attach(service: Service, endpoint: WebhookEndpoint) -> None:
    """Adds the endpoint's listener and supervised tasks to ``service``."""
    service.add_listener(endpoint.listener)
    service.spawn(endpoint.writer.run(), name="webhook-event-writer")
    service.spawn(
        maintenance.run(endpoint.hooks.pool, endpoint.config, endpoint.metrics),
        name="webhook-maintenance",
    )


@contextlib.asynccontextmanager
async def running(
    pool: asyncpg.Pool,
    settings: object,
    *,
    registry: CollectorRegistry | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    sns_trust: SnsTrust | None = None,
    clock: Clock = time.time,
) -> AsyncIterator[WebhookEndpoint]:
    """Runs the endpoint alone in a Service of its own until the block exits."""
    async with http_client() as http:
        endpoint = build(
            pool,
            settings,
            http,
            CollectorRegistry() if registry is None else registry,
            port=port,
            host=host,
            sns_trust=sns_trust,
            clock=clock,
        )
        service = Service("webhooks", grace=5.0)
        attach(service, endpoint)
        async with service.running():
            yield endpoint
