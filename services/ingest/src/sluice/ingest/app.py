"""Wiring of the ingest service: resources, server, and bounded shutdown."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sluice.common.db import create_pool
from sluice.common.grpcserver import ServerHandle, build_server
from sluice.common.telemetry import Telemetry
from sluice.ingest import catalogue
from sluice.ingest.service import IngestServicer
from sluice.ingest.settings import IngestSettings
from sluice.v1 import ingest_pb2, ingest_pb2_grpc

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


@contextlib.asynccontextmanager
async def running(
    settings: IngestSettings, telemetry: Telemetry, *, port: int | None = None
) -> AsyncIterator[ServerHandle]:
    """Runs the ingest gRPC server until the block exits, then shuts it down in order."""
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(settings.require_database(), max_size=settings.db_pool_size)
        stack.push_async_callback(pool.close)
        servicer = IngestServicer(pool, settings)
        stack.push_async_callback(servicer.aclose)
        handle = ServerHandle(build_server(telemetry), [SERVICE_NAME, *catalogue.SERVICE_NAMES])
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(servicer, handle.server)
        stack.push_async_callback(catalogue.register(handle.server, pool, settings))
        await handle.start(settings.listen_host, settings.ingest_port if port is None else port)
        stack.push_async_callback(handle.stop, settings.shutdown_grace_seconds)
        yield handle
