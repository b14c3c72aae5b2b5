"""Wiring of the sender service: its resources (Redis, provider adapters), and the builder
of its Service."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

from sluice.common.app import new_service
from sluice.common.metrics import Metrics
from sluice.common.providers import ProviderConfig, load_providers
from sluice.common.redis import create_redis
from sluice.common.service import Service
from sluice.common.telemetry import Telemetry
from sluice.sender.checks import MessageChecks
from sluice.sender.metrics import SenderMetrics
from sluice.sender.providers import EmailProvider, account_limits, build_adapters
from sluice.sender.ratelimit import RateLimiter
from sluice.sender.render_pool import RenderPool, render_budget
from sluice.sender.service import SenderServicer
from sluice.sender.settings import SenderSettings
from sluice.v1 import sender_pb2, sender_pb2_grpc

SERVICE_NAME = sender_pb2.DESCRIPTOR.services_by_name["SenderService"].full_name
log = logging.getLogger("sluice.sender")


@dataclass(frozen=True)
class SenderResources:
    """What the sender uses, opened once by :func:`open_resources` (or by a test)."""

    redis: aioredis.Redis
    providers: Mapping[str, ProviderConfig]
    adapters: Mapping[str, EmailProvider]
    render_pool: RenderPool


async def open_resources(
    settings: SenderSettings, stack: contextlib.AsyncExitStack
) -> SenderResources:
    """Opens Redis, every provider's adapter and the render workers on ``stack`` (closed in
    reverse). Limits an adapter reads from its provider's account lower the configured
    ones (``account_limits``)."""
    configured = load_providers(settings.providers_file)
    redis = await create_redis(settings.require_redis())
    stack.push_async_callback(redis.aclose)
    adapters = await build_adapters(configured, stack, redis=redis, prefix=settings.redis_prefix)
    providers = await account_limits(configured, adapters)
    render_pool = RenderPool(settings.render_workers, render_budget(settings))
    stack.push_async_callback(render_pool.aclose)
    await render_pool.start()
    return SenderResources(
        redis=redis, providers=providers, adapters=adapters, render_pool=render_pool
    )


def build(
    settings: SenderSettings,
    resources: SenderResources,
    telemetry: Telemetry,
    metrics: Metrics,
    *,
    port: int | None = None,
) -> Service:
    """The sender Service, not started."""
    service, grpc_listener = new_service(
        "sender",
        settings,
        telemetry,
        metrics,
        grpc_port=settings.sender_port if port is None else port,
        service_names=[SERVICE_NAME],
    )
    servicer = SenderServicer(
        resources.providers,
        resources.adapters,
        RateLimiter(resources.redis, settings.redis_prefix),
        telemetry,
        SenderMetrics(metrics),
        render_pool=resources.render_pool,
        checks=MessageChecks(settings.from_domains()),
    )
    if not settings.from_domains():
        log.warning(
            "any from-address domain is sent (SLUICE_SENDER_FROM_DOMAINS is not set): a "
            "caller of SendBatch can send as any domain the provider accounts are verified for"
        )
    sender_pb2_grpc.add_SenderServiceServicer_to_server(servicer, grpc_listener.server)
    return service


@contextlib.asynccontextmanager
async def running(
    settings: SenderSettings,
    telemetry: Telemetry,
    *,
    port: int | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[Service]:
    """Runs the sender until the block exits, then stops it (bounded) and closes resources."""
    async with contextlib.AsyncExitStack() as stack:
        resources = await open_resources(settings, stack)
        service = build(
            settings,
            resources,
            telemetry,
            metrics or Metrics("sender", enabled=settings.metrics_port >= 0),
            port=port,
        )
        await stack.enter_async_context(service.running())
        yield service
