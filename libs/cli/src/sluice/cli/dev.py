"""``sluice dev``: the whole trio in one foreground process, for local work and the demo.

:func:`local_stack` is the one place that assembles a local stack: embedded PostgreSQL and
Redis when ``DATABASE_URL`` / ``REDIS_URL`` are unset, migrations, the demo templates, then
ingest and sender, then the router (which needs the sender's address). Leaving the context
stops them in reverse order: the router first (it gives its leases back), then sender and
ingest, then the embedded servers, so nothing is left running.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sluice.cli.serve import configure_logging, make_telemetry, service_app
from sluice.cli.stack_settings import StackSettings
from sluice.common.auth import new_token, tokens_file_text
from sluice.common.grpcserver import install_stop_signals
from sluice.common.providers import ProviderConfig, load_providers
from sluice.common.settings import CommonSettings

log = logging.getLogger("sluice.cli")

Say = Callable[[str], None]


def _say_to_log(message: str) -> None:
    log.info("%s", message)


def connect_host(listen_host: str) -> str:
    """An address clients on this machine can dial for a server bound to ``listen_host``."""
    if listen_host in ("", "0.0.0.0", "::", "[::]"):  # noqa: S104 - we connect, not bind
        return "127.0.0.1"
    return listen_host


@dataclass(frozen=True)
class LocalStack:
    """Where a running local stack answers, and the settings it runs with."""

    settings: StackSettings
    ingest: str
    router: str
    sender: str
    embedded_database: bool
    embedded_redis: bool
    providers: tuple[ProviderConfig, ...]
    #: A token with scopes submit, read and admin ("" when the stack runs without auth).
    token: str = ""


async def prepare_database(database_url: str) -> list[str]:
    """Migrates ``database_url`` and seeds the demo templates; returns migrations applied."""
    from sluice.cli.seed import seed_templates
    from sluice.common.db import create_pool, migrate

    applied = await migrate(database_url)
    pool = await create_pool(database_url, min_size=1, max_size=2, application_name="sluice-seed")
    try:
        await seed_templates(pool)
    finally:
        await pool.close()
    return applied


def dev_tokens(settings: StackSettings, state_dir: Path) -> tuple[str, StackSettings]:
    """Makes this run's tokens (an operator token and the router's ``send`` token) in a
    private folder under ``state_dir``; returns the operator token and the settings that use
    them. The folder is removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix="sluice-tokens-", dir=_writable(state_dir)))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    tokens = {"dev-operator": new_token(), "dev-router": new_token()}
    scopes = {"dev-operator": ("submit", "read", "admin"), "dev-router": ("send",)}
    tokens_file = folder / "tokens.toml"
    tokens_file.write_text(tokens_file_text(scopes, tokens), encoding="utf-8")
    router_token = folder / "router.token"
    router_token.write_text(tokens["dev-router"], encoding="utf-8")
    for path in (tokens_file, router_token):
        path.chmod(0o600)
    settings = settings.with_common(auth_tokens_file=str(tokens_file))
    settings = replace(
        settings, router=replace(settings.router, sender_token_file=str(router_token))
    )
    return tokens["dev-operator"], settings


def _writable(state_dir: Path) -> Path:
    with contextlib.suppress(OSError):
        state_dir.mkdir(parents=True, exist_ok=True)
        return state_dir
    return Path(tempfile.gettempdir())


@asynccontextmanager
async def local_stack(
    settings: StackSettings,
    *,
    state_dir: Path,
    any_ports: bool = False,
    say: Say = _say_to_log,
) -> AsyncIterator[LocalStack]:
    """Runs ingest, sender and router in this process; yields their addresses.

    With ``any_ports`` every server binds a free port instead of the configured one (the
    demo and tests use it so they never clash with a stack already running).
    """
    providers = load_providers(settings.common.providers_file)  # a bad file fails first
    async with AsyncExitStack() as stack:
        embedded_database = not settings.common.database_url
        embedded_redis = not settings.common.redis_url
        if embedded_database or embedded_redis:
            from sluice.cli.embedded import embedded_postgres
            from sluice.cli.embedded import embedded_redis as start_redis

            if embedded_database:
                say(f"DATABASE_URL is unset: starting a throwaway PostgreSQL under {state_dir}")
                dsn = await stack.enter_async_context(embedded_postgres(state_dir, log=say))
                settings = settings.with_common(database_url=dsn)
            if embedded_redis:
                say(f"REDIS_URL is unset: starting a throwaway Redis under {state_dir}")
                url = await stack.enter_async_context(start_redis(state_dir, log=say))
                settings = settings.with_common(redis_url=url)
        applied = await prepare_database(settings.common.require_database())
        say(
            f"database migrated ({', '.join(applied)})"
            if applied
            else "database schema is up to date"
        )
        host = connect_host(settings.common.listen_host)
        token = ""
        if not settings.common.auth_tokens_file:
            token, settings = dev_tokens(settings, state_dir)
            say("authentication on with tokens made for this run (see SLUICE_TOKEN below)")

        async def start(service: str, service_settings: CommonSettings, configured: int) -> str:
            telemetry = make_telemetry(service_settings, service)
            stack.callback(telemetry.shutdown)
            running = service_app(service)
            handle = await stack.enter_async_context(
                running(service_settings, telemetry, port=0 if any_ports else configured)
            )
            say(f"{service} listening on {service_settings.listen_host}:{handle.port}")
            return f"{host}:{handle.port}"

        ingest = await start("ingest", settings.ingest, settings.ingest.ingest_port)
        sender = await start("sender", settings.sender, settings.sender.sender_port)
        # In one process the router always talks to the sender it runs beside.
        settings = replace(settings, router=replace(settings.router, sender_target=sender))
        router = await start("router", settings.router, settings.router.router_port)
        yield LocalStack(
            settings=settings,
            ingest=ingest,
            router=router,
            sender=sender,
            embedded_database=embedded_database,
            embedded_redis=embedded_redis,
            providers=providers,
            token=token,
        )
        say("stopping router, sender and ingest")
    say("stopped; nothing left running")


def banner(stack: LocalStack) -> str:
    """What ``sluice dev`` prints once the stack is up: addresses and things to try."""
    from sluice.common.logging import redact_url

    def where(url: str, embedded: bool) -> str:
        return f"{url} (embedded, removed on exit)" if embedded else url

    common = stack.settings.common
    lines = [
        "",
        "Sluice is running. Ctrl-C stops everything.",
        "",
        f"  ingest    {stack.ingest:<22} sluice.v1.IngestService",
        f"  router    {stack.router:<22} sluice.v1.RouterService",
        f"  sender    {stack.sender:<22} sluice.v1.SenderService",
        f"  postgres  {where(redact_url(common.database_url), stack.embedded_database)}",
        f"  redis     {where(common.redis_url, stack.embedded_redis)}",
        "  providers",
    ]
    for p in stack.providers:
        limit = (
            "unlimited" if p.unlimited else f"{p.sustained_rate:g}/s sustained, burst {p.burst}/s"
        )
        lines.append(
            f"    {p.name:<9} {p.kind}, ${p.cost_per_thousand:.2f} per 1,000, {limit}, "
            f"for {', '.join(sorted(p.intents))}{'' if p.enabled else ' (disabled)'}"
        )
    submit = (
        '{"intent": {"idempotency_key": "hello-1", "recipient": "ada@example.com", '
        '"intent": "INTENT_TRANSACTIONAL", "template_id": "welcome", '
        '"variables": {"name": "Ada"}}}'
    )
    demo = (
        "sluice demo"
        if stack.ingest == "127.0.0.1:50051"
        else f"sluice demo --target {stack.ingest} --router {stack.router}"
    )
    auth = ' -H "authorization: Bearer $SLUICE_TOKEN"' if stack.token else ""
    lines += ["", "Try, from another terminal:"]
    if stack.token:
        lines.append(f"  export SLUICE_TOKEN={stack.token}   # submit, read, admin; this run only")
    lines += [
        f"  {demo}",
        f"  grpcurl -plaintext {stack.ingest} list",
        f"  grpcurl -plaintext {stack.ingest} describe sluice.v1.IngestService",
        f"  grpcurl -plaintext {stack.ingest} grpc.health.v1.Health/Check",
        f"  grpcurl -plaintext{auth} -d '{submit}' \\",
        f"      {stack.ingest} sluice.v1.IngestService/SubmitIntent",
        f"  grpcurl -plaintext{auth} {stack.router} sluice.v1.RouterService/GetQueueStats",
        f"  grpcurl -plaintext{auth} {stack.router} sluice.v1.RouterService/ListProviders",
        f"  grpcurl -plaintext{auth} {stack.sender} sluice.v1.SenderService/GetCapacity",
        "",
    ]
    return "\n".join(lines)


async def run_stoppable(
    body: Callable[[asyncio.Event, asyncio.Event], Coroutine[Any, Any, int]],
) -> int:
    """Runs ``body(stop, ready)`` with SIGINT/SIGTERM wired to ``stop``.

    Once ``body`` sets ``ready`` it owns the stop: it watches ``stop`` and shuts down in
    order, never under cancellation (shutdown code must be able to await). A signal that
    comes before ``ready`` (say, during initdb) cancels the start-up instead, which the
    start-up contexts unwind, stopping whatever they had started.
    """
    stop = asyncio.Event()
    ready = asyncio.Event()
    install_stop_signals(stop)
    task = asyncio.create_task(body(stop, ready))
    stop_wait = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_wait.cancel()
    if not task.done() and not ready.is_set():
        task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if stop.is_set():
            print("interrupted during start-up; everything started was stopped", file=sys.stderr)
            return 130
        raise


def run_dev(state_dir: str) -> int:
    """``sluice dev``: runs the local stack until Ctrl-C."""
    settings = StackSettings.from_env()
    configure_logging(settings.common, "dev")

    async def body(stop: asyncio.Event, ready: asyncio.Event) -> int:
        async with local_stack(settings, state_dir=Path(state_dir)) as stack:
            print(banner(stack), flush=True)
            ready.set()
            await stop.wait()
        return 0

    return asyncio.run(run_stoppable(body))
