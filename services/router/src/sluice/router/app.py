"""Wiring of the router: its resources (pool, sender channel), and the builder of its
Service (admin gRPC server, dispatcher, queue sampler, bounded shutdown)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import asyncpg
import grpc

from sluice.common.app import new_service
from sluice.common.auth import client_interceptors, read_token_file
from sluice.common.db import create_pool
from sluice.common.grpcserver import MAX_MESSAGE_BYTES
from sluice.common.metrics import Metrics
from sluice.common.providers import ProviderConfig, load_providers
from sluice.common.redis import create_redis
from sluice.common.service import Service
from sluice.common.telemetry import Telemetry
from sluice.common.tls import channel_credentials
from sluice.router.dispatch import Dispatcher
from sluice.router.health import ProviderHealthTracker
from sluice.router.metrics import RouterMetrics, run_sampler
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
#: Seconds between two readings of the queue for the gauges.
QUEUE_SAMPLE_SECONDS = 10.0


@dataclass(frozen=True)
class RouterResources:
    """What the router uses, opened once by :func:`open_resources` (or by a test)."""

    pool: asyncpg.Pool
    sender: SenderServiceAsyncStub
    providers: tuple[ProviderConfig, ...]
    # shares pacing, circuits, outage clocks and capacity between routers; None: each alone
    redis: Any = None


async def open_resources(
    settings: RouterSettings, telemetry: Telemetry, stack: contextlib.AsyncExitStack
) -> RouterResources:
    """Opens the pool and the sender channel on ``stack`` (closed in reverse)."""
    providers = load_providers(settings.providers_file)
    pool = await create_pool(
        settings.require_database(),
        max_size=settings.db_pool_size,
        application_name="sluice-router",
    )
    stack.push_async_callback(pool.close)
    token = read_token_file(settings.sender_token_file, what="SLUICE_SENDER_TOKEN_FILE")
    interceptors = [*telemetry.client_interceptors(), *client_interceptors(token)]
    credentials = channel_credentials(
        settings.sender_tls_ca_file, settings.sender_tls_cert_file, settings.sender_tls_key_file
    )
    if credentials is None:
        channel = grpc.aio.insecure_channel(
            settings.sender_target, options=list(SENDER_CHANNEL_OPTIONS), interceptors=interceptors
        )
    else:
        channel = grpc.aio.secure_channel(
            settings.sender_target,
            credentials,
            options=list(SENDER_CHANNEL_OPTIONS),
            interceptors=interceptors,
        )
    stack.push_async_callback(channel.close)
    # grpc ships no type hints, so the stub's overload cannot see an aio channel.
    sender = cast("SenderServiceAsyncStub", sender_pb2_grpc.SenderServiceStub(channel))
    redis = await create_redis(settings.redis_url, check=False) if settings.redis_url else None
    if redis is not None:
        stack.push_async_callback(redis.aclose)
    return RouterResources(pool=pool, sender=sender, providers=providers, redis=redis)


def build(
    settings: RouterSettings,
    resources: RouterResources,
    telemetry: Telemetry,
    metrics: Metrics,
    *,
    port: int | None = None,
) -> tuple[Service, Dispatcher]:
    """The router Service (not started) and its dispatcher.

    Starting the service starts the dispatcher once the admin server is up; its workers,
    reclaimer and the queue sampler are supervised (one dying fails the service). Stopping
    it: NOT_SERVING, the dispatcher stops (finishing rounds in flight within the grace and
    releasing leases it still holds), then the admin server drains.
    """
    service, grpc_listener = new_service(
        "router",
        settings,
        telemetry,
        metrics,
        grpc_port=settings.router_port if port is None else port,
        service_names=[SERVICE_NAME],
    )
    health = ProviderHealthTracker(resources.providers)
    observer = RouterMetrics(metrics, resources.providers, health)
    dispatcher = Dispatcher(
        settings,
        resources.pool,
        resources.sender,
        resources.providers,
        telemetry,
        health=health,
        metrics=observer,
        redis=resources.redis,
    )
    if dispatcher.state.shared is not None:
        observer.watch_shared_state(dispatcher.state.shared)
    router_pb2_grpc.add_RouterServiceServicer_to_server(
        RouterServicer(
            resources.pool, resources.providers, health, dispatcher.state, dispatcher.book
        ),
        grpc_listener.server,
    )

    async def start_dispatching() -> None:
        await dispatcher.start()
        for task in dispatcher.tasks:
            service.watch(task)
        if metrics.enabled:
            service.spawn(
                run_sampler(resources.pool, observer, interval=QUEUE_SAMPLE_SECONDS),
                name="sluice-router-queue-sampler",
            )

    service.on_start(start_dispatching)
    service.on_drain(dispatcher.stop)
    return service, dispatcher


@contextlib.asynccontextmanager
async def running(
    settings: RouterSettings,
    telemetry: Telemetry,
    *,
    port: int | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[Service]:
    """Runs the router until the block exits, then stops it (bounded), closing resources."""
    async with contextlib.AsyncExitStack() as stack:
        resources = await open_resources(settings, telemetry, stack)
        service, _ = build(
            settings,
            resources,
            telemetry,
            metrics or Metrics("router", enabled=settings.metrics_port >= 0),
            port=port,
        )
        await stack.enter_async_context(service.running())
        yield service
