"""Wiring of the ingest service: its resources, and the builder of its Service."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import asyncpg

from sluice.common.app import new_service
from sluice.common.db import create_pool
from sluice.common.metrics import Metrics
from sluice.common.providers import load_providers
from sluice.common.service import Service
from sluice.common.telemetry import Telemetry
from sluice.ingest import catalogue
from sluice.ingest.metrics import IngestMetrics
from sluice.ingest.service import IngestServicer
from sluice.ingest.settings import IngestSettings
from sluice.ingest.webhooks import endpoint as webhooks
from sluice.v1 import ingest_pb2, ingest_pb2_grpc

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


@dataclass(frozen=True)
class IngestResources:
    """What ingest uses, opened once by :func:`open_resources` (or by a test)."""

    pool: asyncpg.Pool
    #: HTTPS client of the webhook endpoint (SNS certificates, subscription confirmations).
    http: aiohttp.ClientSession | None = None


async def open_resources(
    settings: IngestSettings, stack: contextlib.AsyncExitStack
) -> IngestResources:
    """Opens ingest's resources on ``stack`` (closed in reverse when it unwinds)."""
    pool = await create_pool(
        settings.require_database(),
        max_size=settings.db_pool_size,
        application_name="sluice-ingest",
    )
    stack.push_async_callback(pool.close)
    http = None
    if settings.webhook_port >= 0:
        http = await stack.enter_async_context(webhooks.http_client())
    return IngestResources(pool=pool, http=http)


def build(
    settings: IngestSettings,
    resources: IngestResources,
    telemetry: Telemetry,
    metrics: Metrics,
    *,
    port: int | None = None,
) -> tuple[Service, IngestServicer]:
    """The ingest Service (not started) and its servicer, whose ``aclose`` the caller runs
    after the service stopped."""
    service, grpc_listener = new_service(
        "ingest",
        settings,
        telemetry,
        metrics,
        grpc_port=settings.ingest_port if port is None else port,
        service_names=[SERVICE_NAME, *catalogue.SERVICE_NAMES],
        max_receive_bytes=settings.ingest_max_request_bytes,
    )
    budgets = {kind: w.total_seconds() for kind, w in settings.deadline_windows().items()}
    observer = IngestMetrics(metrics, budgets)
    providers = load_providers(settings.providers_file)
    servicer = IngestServicer(
        resources.pool, settings, observer, providers, waiting_calls=grpc_listener.waiting_calls
    )
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(servicer, grpc_listener.server)
    catalogue.register(grpc_listener.server, resources.pool, settings)
    if settings.webhook_port >= 0:  # webhooks and unsubscribe links, on their own port
        port_ = 0 if port == 0 else settings.webhook_port
        webhooks.attach(
            service,
            webhooks.build(resources.pool, settings, resources.http, metrics.registry, port=port_),
        )
    return service, servicer


@contextlib.asynccontextmanager
async def running(
    settings: IngestSettings,
    telemetry: Telemetry,
    *,
    port: int | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[Service]:
    """Runs ingest until the block exits, then stops it (bounded) and closes resources."""
    async with contextlib.AsyncExitStack() as stack:
        resources = await open_resources(settings, stack)
        service, servicer = build(
            settings,
            resources,
            telemetry,
            metrics or Metrics("ingest", enabled=settings.metrics_port >= 0),
            port=port,
        )
        stack.push_async_callback(servicer.aclose)
        await stack.enter_async_context(service.running())
        yield service
