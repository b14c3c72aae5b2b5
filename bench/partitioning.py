"""``python -m bench.partitioning``: what monthly partitioning costs the hot path.

The bare database pipeline of ``python -m bench`` (``insert_intents`` in batches of 1,000,
then the router's lease -> complete with its workers) on two databases with the same
schema, migrations and SQL, one with ``intents`` partitioned (as migrated) and one with it
converted back to a plain table (same columns, indexes and foreign key). Runs alternate
between the two, so machine noise hits both alike; prints medians of ``--runs`` and the
ratio partitioned / plain.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from bench.e2e import fresh_database, new_intents
from sluice.common.db import create_pool
from sluice.ingest.repository import insert_intents
from sluice.router.repository import Completion, complete, lease

UNPARTITION_SQL = """
CREATE TABLE intents_plain (LIKE intents INCLUDING ALL);
DROP TABLE intents;
ALTER TABLE intents_plain RENAME TO intents;
ALTER TABLE intents ADD CONSTRAINT intents_template_id_fkey
    FOREIGN KEY (template_id) REFERENCES templates (id);
"""


async def pipeline(admin_dsn: str, count: int, plain: bool) -> tuple[float, float]:
    async with fresh_database(admin_dsn) as dsn:
        pool = await create_pool(dsn, min_size=4, max_size=4)
        try:
            if plain:
                await pool.execute(UNPARTITION_SQL)
            rows = new_intents(f"part{uuid.uuid4().hex[:8]}", count)
            batches = [rows[i : i + 1000] for i in range(0, len(rows), 1000)]
            gate = asyncio.Semaphore(4)

            async def insert(batch: Sequence[object]) -> None:
                async with gate:
                    await insert_intents(pool, batch)  # type: ignore[arg-type]

            started = time.perf_counter()
            await asyncio.gather(*(insert(b) for b in batches))
            insert_rate = count / (time.perf_counter() - started)

            async def worker() -> None:
                while True:
                    lease_id = uuid.uuid4()
                    leased = await lease(pool, lease_id=lease_id, limit=500, lease_seconds=30)
                    if not leased:
                        return
                    await complete(
                        pool,
                        lease_id=lease_id,
                        completions=[
                            Completion(intent_id=i.id, status="sent", provider="bench")
                            for i in leased
                        ],
                    )

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(4)))
            pipeline_rate = count / (time.perf_counter() - started)
            sent = await pool.fetchval("SELECT count(*) FROM intents WHERE status = 'sent'")
            assert sent == count, (sent, count)
        finally:
            await pool.close()
    return insert_rate, pipeline_rate


async def main_async(admin_dsn: str, count: int, runs: int) -> None:
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for run in range(runs):
        for plain in (True, False):
            rates = await pipeline(admin_dsn, count, plain)
            results[plain].append(rates)
            label = "plain" if plain else "partitioned"
            print(
                f"[{time.strftime('%H:%M:%S')}] run {run + 1}/{runs} {label}: insert "
                f"{rates[0]:,.0f}/s, lease->complete {rates[1]:,.0f}/s",
                flush=True,
            )
    table = Table(title=f"partitioned vs plain intents: {count:,} intents, median of {runs}")
    for column in ("stage", "plain (baseline)", "partitioned", "ratio"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for i, stage in enumerate(("insert_intents, intents/s", "lease -> complete, intents/s")):
        base = statistics.median(r[i] for r in results[True])
        part = statistics.median(r[i] for r in results[False])
        table.add_row(stage, f"{base:,.0f}", f"{part:,.0f}", f"{part / base:.2f}x")
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.partitioning")
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.dsn, args.count, args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
