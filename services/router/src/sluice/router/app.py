"""Wiring of the router: pool, sender channel, dispatcher, gRPC server, bounded shutdown."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import grpc

from sluice.common.db import create_pool
from sluice.common.grpcserver import MAX_MESSAGE_BYTES, ServerHandle, build_server
from sluice.common.providers import load_providers
from sluice.common.redis import create_redis
from sluice.common.telemetry import Telemetry
from sluice.router.dispatch import Dispatcher
from sluice.router.health import ProviderHealthTracker
from sluice.router.service import RouterServicer
from sluice.router.settings import RouterSettings
from sluice.v1 import router_pb2, router_pb2_grpc, sender_pb2_grpc

if TYPE_CHECKING:
    from sluice.v1.sender_pb2_grpc import SenderServiceAsyncStub

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name

# round_robin spreads SendBatch calls over every address the target resolves to (a headless
# Kubernetes Service gives one per sender pod); the default pick_first would stick to one.
# Keepalive pings only while calls are in flight, well above the servers' default minimum
# ping interval, so an idle channel is never sent GOAWAY for pinging too often.
SENDER_CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # Reconnect to a restarted sender within a second: gRPC's default backoff grows to
    # two minutes, which held mail long after a 2-second sender restart.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


@contextlib.asynccontextmanager
async def running(
    settings: RouterSettings, telemetry: Telemetry, *, port: int | None = None
) -> AsyncIterator[ServerHandle]:
    """Runs the router (admin gRPC server plus dispatcher) until the block exits.

    The dispatcher starts after the server is up. On exit: health NOT_SERVING, the
    dispatcher stops (finishing rounds in flight within the grace period and releasing the
    leases it still holds), then the server drains, then the channel and pool close.
    """
    providers = load_providers(settings.providers_file)
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(
            settings.require_database(),
            max_size=settings.db_pool_size,
            application_name="sluice-router",
        )
        stack.push_async_callback(pool.close)
        channel = grpc.aio.insecure_channel(
            settings.sender_target,
            options=list(SENDER_CHANNEL_OPTIONS),
            interceptors=telemetry.client_interceptors(),
        )
        stack.push_async_callback(channel.close)
        health = ProviderHealthTracker(providers)
        # Redis only shares throttle pacing between routers; without it each paces alone.
        redis = await create_redis(settings.redis_url, check=False) if settings.redis_url else None
        if redis is not None:
            stack.push_async_callback(redis.aclose)
        dispatcher = Dispatcher(
            settings,
            pool,
            # grpc ships no type hints, so the stub's overload cannot see an aio channel.
            cast("SenderServiceAsyncStub", sender_pb2_grpc.SenderServiceStub(channel)),
            providers,
            telemetry,
            health=health,
            redis=redis,
        )
        handle = ServerHandle(build_server(telemetry), [SERVICE_NAME])
        router_pb2_grpc.add_RouterServiceServicer_to_server(
            RouterServicer(pool, providers, health, dispatcher.state, dispatcher.book),
            handle.server,
        )
        await handle.start(settings.listen_host, settings.router_port if port is None else port)
        stack.push_async_callback(_shutdown, handle, dispatcher, settings.shutdown_grace_seconds)
        await dispatcher.start()
        yield handle


async def _shutdown(handle: ServerHandle, dispatcher: Dispatcher, grace: float) -> None:
    """One grace budget for the whole sequence, so shutdown stays bounded by ``grace``."""
    started = time.monotonic()
    await handle.set_serving(False)
    await dispatcher.stop(grace)
    await handle.stop(max(0.5, grace - (time.monotonic() - started)))
