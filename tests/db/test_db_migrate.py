"""sluice.common.db: the pool, the migrator, and its behaviour under concurrency."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sluice.common import db
from sluice.common.errors import ConfigError, Unavailable
from sluice.common.logging import redact_url
from tests.conftest import pg_admin_execute, pg_dsn_for


@pytest.fixture
async def empty_dsn() -> AsyncIterator[str]:
    """A database with nothing in it (not cloned from the migrated template)."""
    name = f"sluice_t_{uuid.uuid4().hex[:12]}"
    await pg_admin_execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_dsn_for(name)
    finally:
        await pg_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def recorded(dsn: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    return [(r["version"], r["name"]) for r in rows]


def test_migrations_are_shipped_in_version_order() -> None:
    found = db.migrations()
    assert found[0].version == 1
    assert found[0].name == "0001_init"
    assert "CREATE TABLE intents" in found[0].sql
    versions = [m.version for m in found]
    assert versions == sorted(set(versions))
    assert all(m.name.startswith(f"{m.version:04d}_") for m in found)


async def test_migrate_applies_everything_once_then_nothing(empty_dsn: str) -> None:
    names = [m.name for m in db.migrations()]

    assert await db.migrate(empty_dsn) == names
    assert await db.migrate(empty_dsn) == []

    assert [name for _, name in await recorded(empty_dsn)] == names
    conn = await asyncpg.connect(empty_dsn)
    try:
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
    finally:
        await conn.close()
    assert {"schema_migrations", "templates", "intents"} <= tables


async def test_migrate_takes_an_open_connection(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await db.migrate(conn) == [m.name for m in db.migrations()]
        assert await db.migrate(conn) == []
        # the session-level advisory lock was given back
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
        assert held == 0
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_migration_once(empty_dsn: str) -> None:
    names = [m.name for m in db.migrations()]

    results = await asyncio.gather(*(db.migrate(empty_dsn) for _ in range(4)))

    # Every caller succeeded; between them they applied each migration exactly once (the
    # first to get the lock applied everything, the others found nothing left to do).
    assert sorted(name for applied in results for name in applied) == sorted(names)
    assert sum(1 for applied in results if applied) == 1
    assert [name for _, name in await recorded(empty_dsn)] == names


async def test_failed_migration_leaves_no_trace_and_releases_the_lock(
    empty_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = db.migrations()
    broken = db.Migration(
        version=9999, name="9999_broken", sql="CREATE TABLE half_done (x int); SELECT 1/0;"
    )
    monkeypatch.setattr(db, "migrations", lambda: [*shipped, broken])

    with pytest.raises(asyncpg.DivisionByZeroError):
        await db.migrate(empty_dsn)

    # the good migrations before it stay applied; the broken one left nothing behind
    assert [name for _, name in await recorded(empty_dsn)] == [m.name for m in shipped]
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
    finally:
        await conn.close()

    monkeypatch.setattr(db, "migrations", lambda: shipped)
    # would hang on the advisory lock (and time out) if the failed run had kept it
    assert await asyncio.wait_for(db.migrate(empty_dsn), timeout=10) == []


async def test_renamed_migration_is_refused(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("UPDATE schema_migrations SET name = '0001_renamed' WHERE version = 1")
        with pytest.raises(ConfigError, match="0001_renamed"):
            await db.migrate(conn)
    finally:
        await conn.close()


async def test_pool_decodes_jsonb_to_dicts(pg_pool: asyncpg.Pool) -> None:
    value = {"name": "Zoë", "n": "1"}
    assert await pg_pool.fetchval("SELECT $1::jsonb", value) == value
    assert await pg_pool.fetchval("""SELECT '{"a": "b"}'::jsonb""") == {"a": "b"}


async def test_unreachable_server_is_unavailable() -> None:
    # port 1 on loopback: nothing listens there, the connection is refused at once
    with pytest.raises(Unavailable, match="unavailable") as caught:
        await db.create_pool("postgresql://postgres:secret@127.0.0.1:1/postgres", min_size=1)
    assert isinstance(caught.value.__cause__, OSError)
    assert "secret" not in str(caught.value)


async def test_unknown_database_is_a_config_error() -> None:
    dsn = pg_dsn_for(f"sluice_missing_{uuid.uuid4().hex[:8]}")
    with pytest.raises(ConfigError) as caught:
        await db.create_pool(dsn)
    assert isinstance(caught.value.__cause__, asyncpg.InvalidCatalogNameError)


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("postgresql://u:pw@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert redact_url("postgresql://u@h/d") == "postgresql://u@h/d"
    assert redact_url("redis://:secret@cache:6379/0") == "redis://:***@cache:6379/0"


def test_rows_affected_reads_command_status() -> None:
    assert db.rows_affected("UPDATE 42") == 42
    assert db.rows_affected("INSERT 0 3") == 3
    assert db.rows_affected("CREATE TABLE") == 0
