"""Wiring of the ingest service: resources, server, and bounded shutdown."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sluice.common.db import create_pool
from sluice.common.grpcserver import ServerHandle, build_server
from sluice.common.telemetry import Telemetry
from sluice.ingest.service import IngestServicer
from sluice.ingest.settings import IngestSettings
from sluice.ingest.webhooks import endpoint as webhook_endpoint
from sluice.v1 import ingest_pb2, ingest_pb2_grpc

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


@contextlib.asynccontextmanager
async def running(
    settings: IngestSettings,
    telemetry: Telemetry,
    *,
    port: int | None = None,
    webhook_port: int | None = None,
) -> AsyncIterator[ServerHandle]:
    """Runs the ingest gRPC server until the block exits, then shuts it down in order.

    The webhook endpoint runs beside it on ``webhook_port`` (default: the setting, or a free
    port when the gRPC ``port`` is 0, as in tests and the demo; -1 turns it off)."""
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(settings.require_database(), max_size=settings.db_pool_size)
        stack.push_async_callback(pool.close)
        servicer = IngestServicer(pool, settings)
        stack.push_async_callback(servicer.aclose)
        handle = ServerHandle(build_server(telemetry), [SERVICE_NAME])
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(servicer, handle.server)
        await handle.start(settings.listen_host, settings.ingest_port if port is None else port)
        stack.push_async_callback(handle.stop, settings.shutdown_grace_seconds)
        if webhook_port is None:
            webhook_port = 0 if port == 0 else settings.webhook_port
        if webhook_port >= 0:
            await stack.enter_async_context(
                webhook_endpoint.running(
                    pool,
                    settings,
                    host=settings.listen_host,
                    port=webhook_port,
                    grace=settings.shutdown_grace_seconds,
                )
            )
        yield handle
