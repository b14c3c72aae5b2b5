"""Wiring of the sender service: Redis, provider adapters, limiter, server, shutdown."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sluice.common.grpcserver import ServerHandle, build_server
from sluice.common.providers import load_providers
from sluice.common.redis import create_redis
from sluice.common.telemetry import Telemetry
from sluice.sender.checks import MessageChecks
from sluice.sender.providers import build_adapters
from sluice.sender.ratelimit import RateLimiter
from sluice.sender.render_pool import RenderPool, render_budget
from sluice.sender.service import SenderServicer
from sluice.sender.settings import SenderSettings
from sluice.v1 import sender_pb2, sender_pb2_grpc

SERVICE_NAME = sender_pb2.DESCRIPTOR.services_by_name["SenderService"].full_name


@contextlib.asynccontextmanager
async def running(
    settings: SenderSettings, telemetry: Telemetry, *, port: int | None = None
) -> AsyncIterator[ServerHandle]:
    """Runs the sender gRPC server until the block exits, then shuts it down in order."""
    providers = {p.name: p for p in load_providers(settings.providers_file)}
    async with contextlib.AsyncExitStack() as stack:
        redis = await create_redis(settings.require_redis())
        stack.push_async_callback(redis.aclose)
        adapters = await build_adapters(
            providers.values(), stack, redis=redis, prefix=settings.redis_prefix
        )
        render_pool = RenderPool(settings.render_workers, render_budget(settings))
        stack.push_async_callback(render_pool.aclose)
        await render_pool.start()
        servicer = SenderServicer(
            providers,
            adapters,
            RateLimiter(redis, settings.redis_prefix),
            telemetry,
            render_pool=render_pool,
            checks=MessageChecks(settings.from_domains()),
        )
        handle = ServerHandle(build_server(telemetry), [SERVICE_NAME])
        sender_pb2_grpc.add_SenderServiceServicer_to_server(servicer, handle.server)
        await handle.start(settings.listen_host, settings.sender_port if port is None else port)
        stack.push_async_callback(handle.stop, settings.shutdown_grace_seconds)
        yield handle
