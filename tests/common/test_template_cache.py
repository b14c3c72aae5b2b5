"""The template cache ingest and the router share: TTL, one query for what is missing."""

from __future__ import annotations

import asyncpg

from sluice.common.templates import TemplateCache
from tests.conftest import InsertTemplate


async def test_cache_serves_within_ttl_reloads_after_and_never_caches_misses(
    pg_pool: asyncpg.Pool, insert_template: InsertTemplate
) -> None:
    await insert_template("a")
    now = [0.0]
    cache = TemplateCache(pg_pool, ttl=10.0, clock=lambda: now[0])
    first = await cache.get_many(["a", "missing", ""])
    assert set(first) == {"a"}
    await pg_pool.execute("UPDATE templates SET subject = 'changed', version = 2 WHERE id = 'a'")
    await insert_template("missing")
    now[0] = 5.0
    second = await cache.get_many(["a", "missing"])
    assert second["a"].subject != "changed"  # still cached
    assert "missing" in second  # misses were never cached
    now[0] = 10.5
    third = await cache.get_many(["a"])
    assert third["a"].subject == "changed"
    assert third["a"].version == 2
