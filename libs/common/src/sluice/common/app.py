"""What every service's builder does the same way: its gRPC listener with the shared
interceptors, and its metrics listener."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sluice.common.auth import AuthInterceptor, TokenStore
from sluice.common.grpcserver import GrpcListener
from sluice.common.http import HttpListener
from sluice.common.metrics import HealthFlag, Metrics, metrics_app
from sluice.common.service import Service
from sluice.common.settings import CommonSettings
from sluice.common.telemetry import Telemetry
from sluice.common.tls import server_credentials

log = logging.getLogger("sluice.auth")


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
        inner_interceptors=_auth(settings, metrics),
        metrics=metrics,
        reflection_enabled=settings.reflection,
        credentials=server_credentials(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        ),
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


def _auth(settings: CommonSettings, metrics: Metrics) -> list[AuthInterceptor]:
    if not settings.auth_tokens_file:
        log.warning(
            "authentication is off (SLUICE_AUTH_TOKENS_FILE is not set): anyone who reaches "
            "this port can call every RPC"
        )
        return []
    return [AuthInterceptor(TokenStore(settings.auth_tokens_file), metrics)]
