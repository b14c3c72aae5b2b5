"""``sluice serve`` and ``sluice migrate``: the production entry points.

``serve`` builds the settings from the environment once, configures logging and tracing,
and runs one service until SIGTERM/SIGINT; the service's ``running()`` context does the
bounded shutdown (NOT_SERVING, drain, give leases back, close resources).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from sluice.common.errors import ConfigError
from sluice.common.grpcserver import install_stop_signals
from sluice.common.logging import setup_logging
from sluice.common.service import Service
from sluice.common.settings import CommonSettings
from sluice.common.telemetry import Telemetry, setup_tracing

log = logging.getLogger("sluice.cli")

SERVICES = ("ingest", "router", "sender")


class RunningFactory(Protocol):
    """The ``running()`` context manager every service's ``app`` module provides."""

    def __call__(
        self, settings: Any, telemetry: Telemetry, *, port: int | None = None
    ) -> AbstractAsyncContextManager[Service]: ...


def service_app(service: str) -> RunningFactory:
    """The ``running`` factory of one service, imported only when that service is wanted."""
    if service == "ingest":
        from sluice.ingest.app import running as ingest_running

        return ingest_running
    if service == "router":
        from sluice.router.app import running as router_running

        return router_running
    if service == "sender":
        from sluice.sender.app import running as sender_running

        return sender_running
    raise ConfigError(f"unknown service {service!r}; choose one of {', '.join(SERVICES)}")


def service_settings(service: str) -> type[CommonSettings]:
    """The settings class of one service."""
    if service == "ingest":
        from sluice.ingest.settings import IngestSettings

        return IngestSettings
    if service == "router":
        from sluice.router.settings import RouterSettings

        return RouterSettings
    if service == "sender":
        from sluice.sender.settings import SenderSettings

        return SenderSettings
    raise ConfigError(f"unknown service {service!r}; choose one of {', '.join(SERVICES)}")


def configure_logging(
    settings: CommonSettings, service: str = "", *, level: str | None = None
) -> None:
    """setup_logging as the settings say (their validation already checked the level)."""
    setup_logging((level or settings.log_level).upper(), settings.log_format, service=service)


def make_telemetry(settings: CommonSettings, service: str) -> Telemetry:
    """This process's tracing for ``service``, as the settings ask."""
    return setup_tracing(service, settings.otel_exporter, otlp_endpoint=settings.otlp_endpoint)


async def serve(service: str, settings: CommonSettings) -> None:
    """Runs ``service`` until a stop signal, then lets its context shut it down.

    Raises ServiceFailed (after the same bounded shutdown) when one of the service's
    supervised tasks died, so the process exits non-zero and its orchestrator restarts it.
    """
    running = service_app(service)
    stop = asyncio.Event()
    # Installed before start-up, so a SIGTERM that arrives while we connect still stops us
    # cleanly right after the server is up instead of killing us half-way.
    install_stop_signals(stop)
    telemetry = make_telemetry(settings, service)
    try:
        async with running(settings, telemetry) as svc:
            others = "".join(
                f"; {listener.name} on {settings.listen_host}:{listener.port}"
                for listener in svc.listeners[1:]
            )
            log.info(
                "%s listening on %s:%d%s",
                service,
                settings.listen_host,
                svc.port,
                others,
                extra={"service": service},
            )
            try:
                await svc.wait(stop)
            finally:
                log.info("%s stopping", service, extra={"service": service})
        log.info("%s stopped", service, extra={"service": service})
    finally:
        telemetry.shutdown()


def run_serve(service: str) -> int:
    """``sluice serve SERVICE``: ConfigError and Unavailable propagate to ``main``."""
    settings = service_settings(service).from_env()
    configure_logging(settings, service)
    asyncio.run(serve(service, settings))
    return 0


async def migrate(database_url: str) -> list[str]:
    """Applies pending migrations to ``database_url``; returns their names."""
    from sluice.common.db import migrate as db_migrate

    return await db_migrate(database_url)


def run_migrate() -> int:
    """``sluice migrate``: prints each migration applied, or that the schema is current."""
    from sluice.common.logging import redact_url

    settings = CommonSettings.from_env()
    configure_logging(settings, level="WARNING")
    url = settings.require_database()
    applied = asyncio.run(migrate(url))
    if applied:
        for name in applied:
            print(f"applied {name}")
        print(f"{len(applied)} migration(s) applied to {redact_url(url)}")
    else:
        print(f"{redact_url(url)} is up to date")
    return 0
