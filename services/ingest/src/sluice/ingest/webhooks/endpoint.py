"""Running the webhook endpoint next to ingest's gRPC server: one context manager that opens
what it needs (an HTTPS client for SNS, the event writer, the listener, the maintenance
loop) and closes it in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import asyncpg

from sluice.ingest.webhooks import maintenance, repository
from sluice.ingest.webhooks.app import Clock, Webhooks, build_app
from sluice.ingest.webhooks.config import WebhookConfig, from_settings
from sluice.ingest.webhooks.listener import AppListener
from sluice.ingest.webhooks.metrics import WebhookMetrics, default_metrics
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
    """A running endpoint."""

    listener: AppListener
    hooks: Webhooks
    config: WebhookConfig

    @property
    def port(self) -> int:
        """The bound HTTP port."""
        return self.listener.port


@contextlib.asynccontextmanager
async def running(
    pool: asyncpg.Pool,
    settings: object,
    *,
    host: str,
    port: int,
    metrics: WebhookMetrics | None = None,
    sns_trust: SnsTrust | None = None,
    clock: Clock = time.time,
    grace: float = 10.0,
) -> AsyncIterator[WebhookEndpoint]:
    """Serves the webhook endpoint for IngestSettings ``settings`` until the block exits."""
    config = from_settings(settings)
    metrics = default_metrics() if metrics is None else metrics
    trust = SnsTrust() if sns_trust is None else sns_trust
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        )
        writer = EventWriter(
            lambda events: repository.record(
                pool,
                events,
                soft_bounce_limit=config.soft_bounce_limit,
                soft_bounce_window=config.soft_bounce_window,
            )
        )
        stack.push_async_callback(writer.aclose)
        sns = SnsVerifier(
            topics=config.ses_topics,
            session=session,
            max_age=config.sns_max_age,
            cert_host=trust.cert_host,
            cert_port=trust.cert_port,
            ssl_context=trust.ssl_context,
        )
        hooks = Webhooks(pool, config, writer, metrics, sns, clock)
        listener = AppListener(build_app(hooks), host, port, name="webhooks")
        await listener.start()
        stack.push_async_callback(listener.stop, grace)
        task = asyncio.create_task(
            maintenance.run(pool, config, metrics), name="webhook-maintenance"
        )

        async def cancel() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        stack.push_async_callback(cancel)
        yield WebhookEndpoint(listener, hooks, config)
