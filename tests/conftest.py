"""Shared fixtures: real Redis with a key prefix per test, real PostgreSQL with a database
per test cloned from a migrated template."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

REDIS_URL = os.environ.get("SLUICE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


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
