"""What every service's builder does the same way: its gRPC listener with the shared
interceptors, and its metrics listener."""

from __future__ import annotations

from collections.abc import Iterable

from sluice.common.grpcserver import GrpcListener
from sluice.common.http import HttpListener
from sluice.common.metrics import HealthFlag, Metrics, metrics_app
from sluice.common.service import Service
from sluice.common.settings import CommonSettings
from sluice.common.telemetry import Telemetry


def new_service(
    name: str,
    settings: CommonSettings,
    telemetry: Telemetry,
    metrics: Metrics,
    *,
    grpc_port: int,
    service_names: Iterable[str],
) -> tuple[Service, GrpcListener]:
    """A service with its gRPC listener (first) and, unless turned off, its metrics
    listener. A ``grpc_port`` of 0 (tests, the demo: any free port) binds the metrics
    listener to any free port too, so stacks side by side never clash."""
    service = Service(name, grace=settings.shutdown_grace_seconds)
    listener = GrpcListener(
        settings.listen_host,
        grpc_port,
        service_names=service_names,
        interceptors=telemetry.server_interceptors(),
        metrics=metrics,
    )
    service.add_listener(listener)
    if settings.metrics_port >= 0:
        health = HealthFlag()
        service.add_listener(
            HttpListener(
                "metrics",
                metrics_app(metrics, health),
                settings.listen_host,
                0 if grpc_port == 0 else settings.metrics_port,
                health=health,
            )
        )
    return service, listener
