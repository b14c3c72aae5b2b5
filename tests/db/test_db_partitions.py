"""Intents partitioned by month: the conversion of an existing table, global idempotency
across partitions, and ``sluice partitions`` (create ahead, move strays, drop expired)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from sluice.cli.partitions import run_partitions
from sluice.common import db
from sluice.common.partitions import maintain_partitions
from sluice.ingest.repository import get_intent, insert_intents
from tests.conftest import pg_admin_execute, pg_dsn_for
from tests.db.db_factories import new_intent


@pytest.fixture
async def v1_dsn() -> AsyncIterator[str]:
    """A database at migration 0001 only, as an installation before partitioning was."""
    name = f"sluice_t_{uuid.uuid4().hex[:12]}"
    await pg_admin_execute(f'CREATE DATABASE "{name}"')
    dsn = pg_dsn_for(name)
    conn = await asyncpg.connect(dsn)
    try:
        first = db.migrations()[0]
        await conn.execute(db.CREATE_MIGRATIONS_TABLE_SQL)
        await conn.execute(first.sql)
        await conn.execute(db.RECORD_SQL, first.version, first.name)
    finally:
        await conn.close()
    try:
        yield dsn
    finally:
        await pg_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def where(pool: asyncpg.Pool | asyncpg.Connection, key: str) -> str:
    return str(
        await pool.fetchval(
            "SELECT tableoid::regclass::text FROM intents WHERE idempotency_key = $1", key
        )
    )


async def test_migration_converts_an_existing_table_keeping_every_row(v1_dsn: str) -> None:
    conn = await db.connect(v1_dsn)
    try:
        await conn.execute(
            "INSERT INTO templates (id, subject, html_body, variables, from_address)"
            " VALUES ('welcome', 's', 'h', '{name}', 'a@example.com')"
        )
        now = await conn.fetchval("SELECT date_trunc('month', now() AT TIME ZONE 'UTC')")
        back = await conn.fetchval(
            "SELECT date_trunc('month', now() AT TIME ZONE 'UTC') - interval '2 months'"
        )
        months = {
            "old-1": back.replace(tzinfo=UTC),
            "cur-1": now.replace(tzinfo=UTC),
            "ancient": datetime(1990, 1, 1, tzinfo=UTC),
        }
        for key, created in months.items():
            await conn.execute(
                "INSERT INTO intents (id, idempotency_key, payload_hash, recipient, kind,"
                " priority, template_id, send_at, deadline, due_at, created_at)"
                " VALUES ($1, $2, 'h', 'a@example.com', 'marketing', 2, 'welcome', $3, $3, $3, $3)",
                uuid.uuid4(),
                key,
                created,
            )
        ids = {
            r["idempotency_key"]: r["id"]
            for r in await conn.fetch("SELECT id, idempotency_key FROM intents")
        }

        applied = await db.migrate(conn)
        assert "0005_catalogue" in applied
        kind = "SELECT relkind::text FROM pg_class WHERE relname = 'intents'"
        assert await conn.fetchval(kind) == "p"
        after = {
            r["idempotency_key"]: r["id"]
            for r in await conn.fetch("SELECT id, idempotency_key FROM intents")
        }
        assert after == ids
        assert await where(conn, "old-1") == "intents_p" + months["old-1"].strftime("%Y%m")
        assert await where(conn, "cur-1") == "intents_p" + now.strftime("%Y%m")
        assert await where(conn, "ancient") == "intents_default"
        keys = {
            r["idempotency_key"]: r["intent_id"]
            for r in await conn.fetch("SELECT * FROM intent_keys")
        }
        assert keys == ids
        # the existing indexes and the template foreign key came along
        indexes = {
            r[0]
            for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'intents'"
            )
        }
        assert {
            "intents_pending_due_idx",
            "intents_leased_expiry_idx",
            "intents_campaign_created_idx",
            "intents_created_idx",
            "intents_recipient_created_idx",
            "intents_pkey",
        } <= indexes
        with pytest.raises(asyncpg.exceptions.ForeignKeyViolationError):
            await insert_intents(conn, [new_intent("no-template", template_id="missing")])
        # a retry of a key stored before the conversion finds its intent
        [outcome] = await insert_intents(conn, [new_intent("old-1", payload=b"h")])
        assert (outcome.created, outcome.intent_id) == (False, ids["old-1"])
    finally:
        await conn.close()


async def test_idempotency_is_global_across_partitions(
    pg_pool: asyncpg.Pool, insert_template: object
) -> None:
    await insert_template()  # type: ignore[operator]
    [first] = await insert_intents(pg_pool, [new_intent("k-1")])
    assert first.created
    # move the intent into last year's partition: its key must still be taken
    await pg_pool.execute("SELECT sluice_create_intent_partitions(0, now() - interval '1 year')")
    await pg_pool.execute("UPDATE intents SET created_at = created_at - interval '1 year'")
    assert (await where(pg_pool, "k-1")).startswith("intents_p")
    [again] = await insert_intents(pg_pool, [new_intent("k-1")])
    assert (again.created, again.conflict, again.intent_id) == (False, False, first.intent_id)
    [other] = await insert_intents(pg_pool, [new_intent("k-1", payload=b"other")])
    assert other.conflict
    assert await pg_pool.fetchval("SELECT count(*) FROM intents") == 1
    stored = await get_intent(pg_pool, first.intent_id)  # type: ignore[arg-type]
    assert stored is not None


async def test_maintenance_creates_ahead_moves_strays_and_drops_expired(
    pg_pool: asyncpg.Pool, insert_template: object
) -> None:
    await insert_template()  # type: ignore[operator]
    await insert_intents(pg_pool, [new_intent("now-1")])
    # an intent created far ahead of every partition (a clock jump) lands in the default
    await pg_pool.execute("SELECT sluice_create_intent_partitions(0)")
    await insert_intents(pg_pool, [new_intent("stray")])
    await pg_pool.execute(
        "UPDATE intents SET created_at = '2031-05-20T10:00:00Z' WHERE idempotency_key = 'stray'"
    )
    await pg_pool.execute(
        "UPDATE intent_keys SET created_at = '2031-05-20T10:00:00Z' WHERE idempotency_key = 'stray'"
    )
    assert await where(pg_pool, "stray") == "intents_default"

    changes = await maintain_partitions(
        pg_pool, months_ahead=1, retain_months=None, at=datetime(2031, 4, 2, tzinfo=UTC)
    )
    assert changes.created[-2:] == ["intents_p203104", "intents_p203105"]
    assert changes.dropped == []
    assert await where(pg_pool, "stray") == "intents_p203105"
    again = await maintain_partitions(
        pg_pool, months_ahead=1, retain_months=None, at=datetime(2031, 4, 2, tzinfo=UTC)
    )
    assert again.created == []

    # retention: from June 2031, keeping 1 month, everything before May 2031 goes
    dropped = await maintain_partitions(
        pg_pool, months_ahead=0, retain_months=1, at=datetime(2031, 6, 1, tzinfo=UTC)
    )
    assert "intents_p203105" not in dropped.dropped
    assert "intents_p203104" in dropped.dropped
    assert (
        await pg_pool.fetchval("SELECT count(*) FROM intents WHERE idempotency_key = 'now-1'") == 0
    )
    assert (
        await pg_pool.fetchval("SELECT count(*) FROM intent_keys WHERE idempotency_key = 'now-1'")
        == 0
    )
    assert await where(pg_pool, "stray") == "intents_p203105"
    # after retention the key is free again: a new intent, not a dangling id
    [reused] = await insert_intents(pg_pool, [new_intent("now-1")])
    assert reused.created


def test_sluice_partitions_command(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_dsn)
    assert run_partitions(months_ahead=6, retain_months=None) == 0
    out = capsys.readouterr().out
    assert out.count("created intents_p") >= 3  # the migration made 2 ahead; 6 asks for more
    assert run_partitions(months_ahead=6, retain_months=None) == 0
    assert "partitions are current" in capsys.readouterr().out
