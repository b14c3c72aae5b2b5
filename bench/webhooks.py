"""``python -m bench.webhooks``: delivery webhook events/s, median of runs.

Each run seeds ``--count`` sent intents (SendGrid message ids), then posts one delivered
event per intent (1 % of them a hard bounce instead) as signed SendGrid Event Webhook
batches of 100 events per request, ``--concurrency`` requests in flight, to the real
endpoint over loopback HTTP, and times until every request was answered 200. Each event
goes through the signature check (ECDSA P-256), the timestamp check, parsing, the
idempotency key, intent matching by the X-Message-Id prefix, the state update and the
events insert, in batched statements. The baseline is the same batches handed straight to
``repository.record`` (no HTTP, no signature) in the same process, on fresh intents. Uses
DATABASE_URL when set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.e2e import fresh_database, new_intents, servers
from sluice.common.db import create_pool
from sluice.ingest.repository import insert_intents
from sluice.ingest.settings import IngestSettings
from sluice.ingest.webhooks import endpoint, repository, sendgrid_sig
from sluice.ingest.webhooks.parse import parse_sendgrid

BATCH = 100


def _events(rows: list[tuple[uuid.UUID, str, str]]) -> list[list[dict[str, Any]]]:
    now = int(time.time())
    items = [
        {
            "email": recipient,
            "timestamp": now,
            "event": "bounce" if i % 100 == 0 else "delivered",
            "type": "bounce",
            "sg_event_id": uuid.uuid4().hex,
            "sg_message_id": f"{message_id}.filterdrecv-bench-{i}",
        }
        for i, (_, recipient, message_id) in enumerate(rows)
    ]
    return [items[i : i + BATCH] for i in range(0, len(items), BATCH)]


async def _seed(pool: asyncpg.Pool, run: str, count: int) -> list[tuple[uuid.UUID, str, str]]:
    rows = new_intents(run, count)
    await insert_intents(pool, rows)
    ids = [r.id for r in rows]
    message_ids = [f"bench{uuid.uuid4().hex[:18]}" for _ in rows]
    await pool.execute(
        "UPDATE intents SET status = 'sent', provider = 'sendgrid', provider_message_id = u.m"
        " FROM unnest($1::uuid[], $2::text[]) AS u(id, m) WHERE intents.id = u.id",
        ids,
        message_ids,
    )
    return [(r.id, r.recipient, m) for r, m in zip(rows, message_ids, strict=True)]


async def _through_http(
    url: str, key: ec.EllipticCurvePrivateKey, batches: list[list[dict[str, Any]]], inflight: int
) -> float:
    bodies = [json.dumps(b).encode() for b in batches]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            headers = {
                **_sign(key, body),
                "content-type": "application/json",
            }
            async with http.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"webhook answered {resp.status}")

    async with aiohttp.ClientSession() as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(inflight)))
        return time.perf_counter() - started


def _sign(key: ec.EllipticCurvePrivateKey, body: bytes) -> dict[str, str]:
    ts = str(int(time.time()))
    return {
        sendgrid_sig.SIGNATURE_HEADER: sendgrid_sig.sign(key, ts, body),
        sendgrid_sig.TIMESTAMP_HEADER: ts,
    }


async def _direct(pool: asyncpg.Pool, batches: list[list[dict[str, Any]]], inflight: int) -> float:
    parsed = [parse_sendgrid(json.dumps(b).encode()) for b in batches]
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for events in parsed:
        queue.put_nowait(events)

    async def worker() -> None:
        while not queue.empty():
            await repository.record(
                pool, queue.get_nowait(), soft_bounce_limit=3, soft_bounce_window=86_400
            )

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return time.perf_counter() - started


async def main(count: int, runs: int, inflight: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = base64.b64encode(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).decode()
    http_rates: list[float] = []
    direct_rates: list[float] = []
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        async with servers(Path(tmp), lambda m: print(m, flush=True)) as srv:
            for run in range(runs):
                async with fresh_database(srv.admin_dsn) as dsn:
                    pool = await create_pool(dsn, max_size=8)
                    try:
                        settings = IngestSettings(
                            database_url=dsn, sendgrid_webhook_public_key=public
                        )
                        rows = await _seed(pool, f"b{run}h", count)
                        base_rows = await _seed(pool, f"b{run}d", count)
                        async with endpoint.running(pool, settings) as ep:
                            url = f"http://127.0.0.1:{ep.port}/webhooks/sendgrid"
                            seconds = await _through_http(url, key, _events(rows), inflight)
                        http_rates.append(count / seconds)
                        seconds = await _direct(pool, _events(base_rows), inflight)
                        direct_rates.append(count / seconds)
                        moved = await pool.fetchval(
                            "SELECT count(*) FROM intents WHERE status IN ('delivered','bounced')"
                        )
                        assert moved == 2 * count, moved
                    finally:
                        await pool.close()
                print(
                    f"run {run + 1}: http {http_rates[-1]:,.0f} events/s,"
                    f" direct {direct_rates[-1]:,.0f} events/s",
                    flush=True,
                )
    med_http, med_direct = statistics.median(http_rates), statistics.median(direct_rates)
    print()
    print(f"delivery webhooks: {count:,} events per run, batches of {BATCH}, {inflight} in flight,")
    print(f"median of {runs} (min-max)")
    print("| stage | events/s | ratio |")
    print("|---|---|---|")
    print(
        f"| SendGrid webhook over HTTP: verify + parse + state update | {med_http:,.0f}"
        f" ({min(http_rates):,.0f}-{max(http_rates):,.0f})"
        f" | {med_http / med_direct:.2f}x baseline |"
    )
    print(
        f"| baseline: repository.record, same batches, no HTTP or signature | {med_direct:,.0f}"
        f" ({min(direct_rates):,.0f}-{max(direct_rates):,.0f}) | 1.00x |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="events per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    args = parser.parse_args()
    asyncio.run(main(args.count, args.runs, args.concurrency))
