"""``python -m bench.lease``: what the fair-share lease costs against the strict one.

A queue of ``--rows`` due marketing intents (one huge campaign holding 98 %, and
``--campaigns`` small ones sharing the rest), in a database of its own (created from
DATABASE_URL, migrated, dropped afterwards). Each sample leases ``--limit`` rows and
writes them back as sent (complete), ``--leases`` times, strict and fair samples taking
turns on the same queue; the figure is leased rows per second, median of 3
runs, with the fair lease as a ratio of the strict one measured in the same process. It also
prints how many of a fair lease's rows the small campaigns got.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections import Counter

import asyncpg

from sluice.common.db import create_pool, migrate
from sluice.router import repository

SEED_SQL = """
INSERT INTO templates (id, subject, html_body, from_address)
VALUES ('bench', 's', 'h', 'bench@example.com');
INSERT INTO intents (id, idempotency_key, payload_hash, campaign_id, recipient, kind, priority,
                     template_id, send_at, deadline, due_at)
SELECT gen_random_uuid(), 'k' || g, '\\x00'::bytea,
       CASE WHEN g % 50 = 0 THEN 'small-' || (g / 50 % $CAMPAIGNS) ELSE 'huge' END,
       'u' || g || '@example.com', 'marketing', 2, 'bench',
       now() - interval '1 hour', now() + interval '1 day',
       now() - interval '1 hour' + make_interval(secs => g / 1000.0)
FROM generate_series(1, $ROWS) g;
ANALYZE intents;
"""


async def sample(pool: asyncpg.Pool, *, share: float, limit: int, leases: int) -> float:
    leased = 0
    started = time.perf_counter()
    for _ in range(leases):
        lease_id = uuid.uuid4()
        got = await repository.lease(
            pool, lease_id=lease_id, limit=limit, lease_seconds=30, campaign_share=share
        )
        leased += len(got)
        done = [repository.Completion(intent_id=i.id, status="sent") for i in got]
        await repository.complete(pool, lease_id=lease_id, completions=done)
    return leased / (time.perf_counter() - started)


async def main(rows: int, campaigns: int, limit: int, leases: int, runs: int) -> None:
    admin = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"bench_lease_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    dsn = admin.rsplit("/", 1)[0] + f"/{name}"
    try:
        await migrate(dsn)
        pool = await create_pool(dsn, max_size=2, application_name="bench-lease")
        try:
            sql = SEED_SQL.replace("$CAMPAIGNS", str(campaigns)).replace("$ROWS", str(rows))
            await pool.execute(sql)
            probe = await repository.lease(
                pool, lease_id=uuid.uuid4(), limit=limit, lease_seconds=30, campaign_share=0.5
            )
            small = sum(n for c, n in Counter(i.campaign_id for i in probe).items() if c != "huge")
            await pool.execute(
                "UPDATE intents SET status = 'pending', lease_id = NULL, "
                "lease_expires_at = NULL WHERE status = 'leased'"
            )
            figures: dict[str, list[float]] = {"strict": [], "fair": []}
            for _ in range(runs):
                figures["strict"].append(await sample(pool, share=1.0, limit=limit, leases=leases))
                figures["fair"].append(await sample(pool, share=0.5, limit=limit, leases=leases))
        finally:
            await pool.close()
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await conn.close()
    base = statistics.median(figures["strict"])
    print(f"lease {limit} + complete, {rows:,} due rows, 1 huge + {campaigns} small campaigns,")
    print(f"median of {runs} runs of {leases} leases")
    print(f"{'lease':<8}{'rows/s':>12}{'min':>10}{'max':>10}{'ratio':>8}")
    for mode, values in figures.items():
        med = statistics.median(values)
        print(f"{mode:<8}{med:>12,.0f}{min(values):>10,.0f}{max(values):>10,.0f}{med / base:>8.2f}")
    print(f"small campaigns' rows in one fair lease of {limit}: {small} (strict: 0)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--campaigns", type=int, default=20)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--leases", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.campaigns, args.limit, args.leases, args.runs))
