"""``python -m bench.catalogue``: the catalogue's read paths on many intents, and templates.

Creates a throwaway database on the server of ``--dsn`` (default ``DATABASE_URL``, else the
local PostgreSQL), migrates it, fills ``intents`` (monthly partitions over 300 days) and
``intent_keys`` with ``--rows`` rows by ``INSERT ... SELECT generate_series`` (2 % pending,
the rest sent; 2,000 campaigns; 1,000,000 recipients), then per run measures, on
``--samples`` random keys each:

- GetIntent (``repository.get_intent`` by id), ListIntents by campaign and by recipient
  (first page of 100, ``listing.list_intents``), and the router's lease of 500 (rolled back,
  so every run sees the same queue): latency p50/p95;
- baseline: a primary-key lookup in the unpartitioned ``intent_keys`` (same row count);
- over real gRPC against an in-process ingest: CreateTemplate (compile checks included),
  PreviewTemplate and, as baseline, GetTemplate: requests/s with 4 in flight.

Prints a table of medians over ``--runs`` and drops the database afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import grpc
from rich.console import Console
from rich.table import Table

from sluice.common import db
from sluice.common.telemetry import disabled
from sluice.ingest import app, listing
from sluice.ingest.repository import get_intent
from sluice.ingest.settings import IngestSettings
from sluice.router import repository as router_repo
from sluice.v1 import template_pb2, template_pb2_grpc

FILL_SQL = """
INSERT INTO intents (id, idempotency_key, payload_hash, campaign_id, recipient, kind,
                     priority, template_id, variables, send_at, deadline, due_at, status,
                     created_at, updated_at)
SELECT gen_random_uuid(), 'bench-' || g, '\\x00'::bytea, 'campaign-' || (g % 2000),
       'user' || (g % 1000000) || '@example.com', 'marketing', 2, 'bench', '{"name": "x"}',
       t, t + interval '400 days', t,
       (CASE WHEN g % 50 = 0 THEN 'pending' ELSE 'sent' END)::intent_status, t, t
FROM generate_series($1::bigint, $2::bigint) AS g,
     LATERAL (SELECT now() - (g::float8 / $3) * interval '300 days' AS t) AS x
"""
KEYS_SQL = """
INSERT INTO intent_keys (idempotency_key, intent_id, payload_hash, created_at)
SELECT idempotency_key, id, payload_hash, created_at FROM intents
"""
CHUNK = 1_000_000


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _dsn_for(dsn: str, database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


async def fill(pool: asyncpg.Pool, rows: int) -> None:
    await pool.execute(
        "INSERT INTO templates (id, subject, html_body, text_body, variables, from_address)"
        " VALUES ('bench', 'Hi {{ name }}', '<p>Hi {{ name }}</p>', 'Hi', '{name}',"
        " 'bench@example.com')"
    )
    await pool.execute(
        "SELECT sluice_create_intent_partitions(1, now(), now() - interval '301 days')"
    )
    started = time.monotonic()
    for low in range(1, rows + 1, CHUNK):
        high = min(rows, low + CHUNK - 1)
        await pool.execute(FILL_SQL, low, high, rows, timeout=3600)
        _progress(f"  {high:,} / {rows:,} intents ({time.monotonic() - started:.0f} s)")
    await pool.execute(KEYS_SQL, timeout=3600)
    await pool.execute("VACUUM ANALYZE intents", timeout=3600)
    await pool.execute("VACUUM ANALYZE intent_keys", timeout=3600)
    _progress(f"filled in {time.monotonic() - started:.0f} s")


def _percentiles(latencies: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return statistics.median(ordered) * 1000, p95 * 1000


async def _timed(calls: Sequence[Callable[[], Awaitable[Any]]]) -> tuple[float, float]:
    latencies = []
    for call in calls:
        start = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - start)
    return _percentiles(latencies)


async def _lease_rolled_back(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            got = await router_repo.lease(conn, lease_id=uuid.uuid4(), limit=500, lease_seconds=30)
            assert len(got) == 500, len(got)
        finally:
            await tx.rollback()


async def measure_reads(pool: asyncpg.Pool, samples: int) -> dict[str, tuple[float, float]]:
    picks = await pool.fetch(
        "SELECT id, idempotency_key, campaign_id, recipient FROM intents"
        " TABLESAMPLE SYSTEM (0.5) LIMIT $1",
        samples,
    )
    random.shuffle(picks)
    return {
        "GetIntent": await _timed([lambda r=r: get_intent(pool, r["id"]) for r in picks]),
        "ListIntents by campaign": await _timed(
            [
                lambda r=r: listing.list_intents(pool, limit=100, campaign_id=r["campaign_id"])
                for r in picks
            ]
        ),
        "ListIntents by recipient": await _timed(
            [
                lambda r=r: listing.list_intents(pool, limit=100, recipient=r["recipient"])
                for r in picks
            ]
        ),
        "lease 500 (router)": await _timed(
            [lambda: _lease_rolled_back(pool)] * max(10, samples // 10)
        ),
        "baseline: intent_keys PK lookup": await _timed(
            [
                lambda r=r: pool.fetchrow(
                    "SELECT * FROM intent_keys WHERE idempotency_key = $1", r["idempotency_key"]
                )
                for r in picks
            ]
        ),
    }


async def _rate(count: int, in_flight: int, call: Callable[[int], Awaitable[Any]]) -> float:
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            await call(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return count / (time.perf_counter() - start)


async def measure_templates(dsn: str, run: int, count: int) -> dict[str, float]:
    settings = IngestSettings(database_url=dsn, db_pool_size=4)
    async with (
        app.running(settings, disabled(), port=0) as handle,
        grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel,
    ):
        stub = template_pb2_grpc.TemplateServiceStub(channel)
        body = (
            "<h1>Hello {{ name }}</h1>{% for i in range(20) %}<p>line {{ i }} for"
            " {{ name|upper }}</p>{% endfor %}{% if vip %}<b>VIP</b>{% endif %}"
        )

        def create(i: int) -> Awaitable[Any]:
            return stub.CreateTemplate(
                template_pb2.CreateTemplateRequest(
                    template_id=f"bench-{run}-{i}",
                    subject="Hi {{ name }}",
                    html_body=body,
                    text_body="Hi {{ name }}",
                    variables=["name", "vip"],
                    from_address="Bench <bench@example.com>",
                )
            )

        created = await _rate(count, 4, create)
        preview = await _rate(
            count,
            4,
            lambda i: stub.PreviewTemplate(
                template_pb2.PreviewTemplateRequest(
                    template_id=f"bench-{run}-{i % 20}", variables={"name": "Ana", "vip": ""}
                )
            ),
        )
        get = await _rate(
            count,
            4,
            lambda i: stub.GetTemplate(
                template_pb2.GetTemplateRequest(template_id=f"bench-{run}-{i % 20}")
            ),
        )
    return {"CreateTemplate": created, "PreviewTemplate": preview, "baseline: GetTemplate": get}


async def main_async(dsn: str, rows: int, runs: int, samples: int, templates: int) -> None:
    name = f"sluice_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    target = _dsn_for(dsn, name)
    try:
        await db.migrate(target)
        pool = await db.create_pool(target, min_size=2, max_size=4)
        try:
            _progress(f"filling {name} with {rows:,} intents")
            await fill(pool, rows)
            parts = await pool.fetchval(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'intents'::regclass"
            )
            reads: list[dict[str, tuple[float, float]]] = []
            rates: list[dict[str, float]] = []
            for run in range(runs):
                _progress(f"run {run + 1}/{runs}")
                reads.append(await measure_reads(pool, samples))
                rates.append(await measure_templates(target, run, templates))
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print_table(reads, rates, rows, runs, samples, int(parts))


def print_table(
    reads: list[dict[str, tuple[float, float]]],
    rates: list[dict[str, float]],
    rows: int,
    runs: int,
    samples: int,
    partitions: int,
) -> None:
    table = Table(
        title=(
            f"catalogue bench: {rows:,} intents in {partitions} partitions, {samples} samples"
            f" per query, median of {runs} run(s)"
        )
    )
    for column in ("stage", "p50 ms", "p95 ms", "ratio vs baseline (p50)"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    base = statistics.median(r["baseline: intent_keys PK lookup"][0] for r in reads)
    for stage in reads[0]:
        p50 = statistics.median(r[stage][0] for r in reads)
        p95 = statistics.median(r[stage][1] for r in reads)
        table.add_row(stage, f"{p50:.2f}", f"{p95:.2f}", f"{p50 / base:.1f}x")
    Console().print(table)
    rate_table = Table(title=f"templates over gRPC, 4 in flight, median of {runs} run(s)")
    for column in ("stage", "requests/s", "ratio vs baseline"):
        rate_table.add_column(column, justify="left" if column == "stage" else "right")
    base_rate = statistics.median(r["baseline: GetTemplate"] for r in rates)
    for stage in rates[0]:
        value = statistics.median(r[stage] for r in rates)
        rate_table.add_row(stage, f"{value:,.0f}", f"{value / base_rate:.2f}x")
    Console().print(rate_table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.catalogue")
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a server where this role may create and drop a database",
    )
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--templates", type=int, default=300, help="requests per template stage")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.dsn, args.rows, args.runs, args.samples, args.templates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
