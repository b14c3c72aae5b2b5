"""Wiring of the ingest service: resources, server, and bounded shutdown."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sluice.common.db import create_pool
from sluice.common.grpcserver import ServerHandle, build_server
from sluice.common.providers import load_providers
from sluice.common.telemetry import Telemetry
from sluice.ingest import wire
from sluice.ingest.service import IngestServicer
from sluice.ingest.settings import IngestSettings
from sluice.v1 import ingest_pb2

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


@contextlib.asynccontextmanager
async def running(
    settings: IngestSettings, telemetry: Telemetry, *, port: int | None = None
) -> AsyncIterator[ServerHandle]:
    """Runs the ingest gRPC server until the block exits, then shuts it down in order."""
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(settings.require_database(), max_size=settings.db_pool_size)
        stack.push_async_callback(pool.close)
        servicer = IngestServicer(pool, settings, load_providers(settings.providers_file))
        stack.push_async_callback(servicer.aclose)
        server = build_server(telemetry, max_receive_bytes=settings.ingest_max_request_bytes)
        handle = ServerHandle(server, [SERVICE_NAME])
        wire.add_to_server(servicer, handle.server)
        await handle.start(settings.listen_host, settings.ingest_port if port is None else port)
        stack.push_async_callback(handle.stop, settings.shutdown_grace_seconds)
        yield handle
