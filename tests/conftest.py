"""Shared fixtures: real Redis with a key prefix per test, real PostgreSQL with a database
per test cloned from a migrated template.

Where the servers come from: ``SLUICE_TEST_PG_ADMIN_DSN`` / ``SLUICE_TEST_REDIS_URL`` when
set; else the machine's own on 127.0.0.1:5432 / 6379 when they answer (and
``SLUICE_TEST_EMBEDDED`` is not 1); else throwaway ones started for this session by
:mod:`sluice.cli.embedded` (the same code ``sluice dev`` uses), so the suite runs on a fresh
machine with nothing listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class _EmbeddedServers(threading.Thread):
    """Throwaway PostgreSQL and/or Redis for this session, run on their own event loop."""

    def __init__(self, postgres: bool, redis: bool) -> None:
        super().__init__(name="embedded-test-servers", daemon=True)
        self.want_postgres, self.want_redis = postgres, redis
        self.pg_admin_dsn = self.redis_url = ""
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        from sluice.cli.embedded import embedded_postgres, embedded_redis

        self._loop, self._stop_event = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with contextlib.AsyncExitStack() as stack:
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sluice-test-")))
                if self.want_postgres:
                    dsn = await stack.enter_async_context(embedded_postgres(root, log=print))
                    self.pg_admin_dsn = urlunsplit(urlsplit(dsn)._replace(path="/postgres"))
                if self.want_redis:
                    self.redis_url = await stack.enter_async_context(
                        embedded_redis(root, log=print)
                    )
                self.ready.set()
                await self._stop_event.wait()
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self.join(timeout=60)


_embedded: _EmbeddedServers | None = None


def _ensure_servers() -> None:
    # Runs at import, before the constants below are read. The chosen URLs go into the
    # environment, so a second import of this module (tests import REDIS_URL from it) and
    # the service processes that tests start see the same servers.
    # SLUICE_TEST_EMBEDDED=1 uses throwaway servers even when the machine's answer.
    global _embedded
    force = os.environ.get("SLUICE_TEST_EMBEDDED") == "1"
    need_pg = "SLUICE_TEST_PG_ADMIN_DSN" not in os.environ and (
        force or not _answers("127.0.0.1", 5432)
    )
    need_redis = "SLUICE_TEST_REDIS_URL" not in os.environ and (
        force or not _answers("127.0.0.1", 6379)
    )
    if not (need_pg or need_redis):
        return
    _embedded = _EmbeddedServers(need_pg, need_redis)
    _embedded.start()
    _embedded.ready.wait(timeout=300)
    if _embedded.error is not None or not _embedded.ready.is_set():
        raise RuntimeError(
            "no PostgreSQL/Redis on 127.0.0.1 and the throwaway ones did not start"
        ) from _embedded.error
    if need_pg:
        os.environ["SLUICE_TEST_PG_ADMIN_DSN"] = _embedded.pg_admin_dsn
    if need_redis:
        os.environ["SLUICE_TEST_REDIS_URL"] = _embedded.redis_url


def pytest_unconfigure(config: pytest.Config) -> None:
    if _embedded is not None:
        _embedded.stop()


_ensure_servers()

REDIS_URL = os.environ.get("SLUICE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without any Sluice configuration, plus ``overrides``
    (for the ``sluice`` processes tests start). Metrics listeners bind any free port unless
    ``overrides`` says otherwise, so test processes never take the default ports."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLUICE_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env["SLUICE_METRICS_PORT"] = "0"
    env.update(overrides)
    return env


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test or run shares (no braces: hash tags follow it)."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis_client(redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


# --- PostgreSQL -------------------------------------------------------------------------
# One template database per test session, migrated once with the real migrator; every test
# that asks for pg_dsn gets a fresh copy (CREATE DATABASE ... TEMPLATE copies files, ~tens of
# ms) and it is dropped afterwards. Names are random, so parallel sessions never collide.

PG_ADMIN_DSN = os.environ.get(
    "SLUICE_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def pg_dsn_for(database: str) -> str:
    """The admin DSN pointed at another database on the same server."""
    return urlunsplit(urlsplit(PG_ADMIN_DSN)._replace(path=f"/{database}"))


async def pg_admin_execute(*statements: str) -> None:
    """Run statements (no parameters: CREATE/DROP DATABASE take none) as the admin role."""
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def pg_template_db() -> AsyncIterator[str]:
    """Name of a database migrated to the latest schema, used only as a CREATE template."""
    from sluice.common.db import migrate

    name = f"sluice_tmpl_{uuid.uuid4().hex[:12]}"
    await pg_admin_execute(f'CREATE DATABASE "{name}"')
    try:
        await migrate(pg_dsn_for(name))
        yield name
    finally:
        await asyncio.gather(*_pg_pending_drops, return_exceptions=True)
        await pg_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Dropping a test database takes 0.1-1 s on a busy box; nothing waits for it, so it runs in
# the background while the next test starts, and the session waits for all of them at the end.
_pg_pending_drops: set[asyncio.Task[None]] = set()


def _drop_in_background(name: str) -> None:
    task = asyncio.get_running_loop().create_task(
        pg_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    )
    _pg_pending_drops.add(task)
    task.add_done_callback(_pg_pending_drops.discard)


@pytest.fixture
async def pg_dsn(pg_template_db: str) -> AsyncIterator[str]:
    """DSN of a fresh, migrated, empty database of this test's own (dropped afterwards)."""
    name = f"sluice_t_{uuid.uuid4().hex[:12]}"
    await pg_admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template_db}"')
    try:
        yield pg_dsn_for(name)
    finally:
        _drop_in_background(name)


@pytest.fixture
async def pg_pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A sluice.common.db pool (jsonb codec included) on this test's database."""
    from sluice.common.db import create_pool

    pool = await create_pool(pg_dsn, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


InsertTemplate = Callable[..., Awaitable[str]]


@pytest.fixture
def insert_template(pg_pool: asyncpg.Pool) -> InsertTemplate:
    """``await insert_template(id="welcome", variables=("name",))`` stores a minimal template
    (for tests that need the intents.template_id foreign key satisfied) and returns its id."""

    async def insert(id: str = "welcome", variables: tuple[str, ...] = ("name",)) -> str:
        await pg_pool.execute(
            "INSERT INTO templates (id, subject, html_body, text_body, variables, from_address)"
            " VALUES ($1, 'Hi {{ name }}', '<p>Hi {{ name }}</p>', 'Hi {{ name }}', $2,"
            " 'noreply@example.com') ON CONFLICT (id) DO NOTHING",
            id,
            list(variables),
        )
        return id

    return insert
