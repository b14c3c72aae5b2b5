"""``python -m bench.ingest``: ingest's front door, measured (a table, median of N runs).

Rows, each against a fresh database and real ``sluice serve`` processes:
- unary SubmitIntent at fixed offered loads (open loop: a call starts every 1/rate s
  whether or not earlier ones finished, so queueing shows in the latency), with the router
  and sender running: p50/p95/p99 of accepted calls, accepted vs shed (RESOURCE_EXHAUSTED);
- SubmitIntents, 1,000 per batch, 4 batches in flight: intents/s;
- SubmitIntentStream, one stream of chunks: intents/s for a campaign of --stream-count;
- the seed's style as the baseline: one transaction and one INSERT per intent, 10
  connections at once, straight to PostgreSQL; the ratios are against it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from tempfile import TemporaryDirectory

import asyncpg
import grpc

from bench.e2e import (
    PROVIDERS_TOML,
    Servers,
    Service,
    fresh_database,
    new_intents,
    servers,
    submissions,
)
from sluice.cli.embedded import find_free_port
from sluice.v1 import ingest_pb2, ingest_pb2_grpc

SEED_INSERT_SQL = """
INSERT INTO intents (id, idempotency_key, payload_hash, campaign_id, recipient, kind,
                     priority, template_id, variables, send_at, deadline, due_at)
VALUES ($1, $2, $3, $4, $5, $6::intent_kind, $7, $8, $9::jsonb, $10, $11, $10)
ON CONFLICT (idempotency_key) DO NOTHING
"""


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def open_loop(target: str, rate: float, seconds: float, tag: str) -> dict[str, float]:
    """Offers ``rate`` SubmitIntent calls/s for ``seconds``; latencies of accepted calls."""
    items = submissions(tag, int(rate * seconds))
    latencies: list[float] = []
    shed = other = 0
    codes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        await stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=items[0]))  # warm up

        async def one(item: object) -> None:
            nonlocal shed, other
            started = time.perf_counter()
            try:
                await stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=item), timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    shed += 1
                else:
                    other += 1
                    codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                return
            latencies.append(time.perf_counter() - started)

        tasks = []
        start = time.perf_counter()
        for i, item in enumerate(items[1:], 1):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(item)))
        await asyncio.gather(*tasks)
    ms = [x * 1000 for x in latencies]
    if codes:
        print(f"    other errors at {rate}/s: {codes}", flush=True)
    return {
        "p50": _percentile(ms, 0.50),
        "p95": _percentile(ms, 0.95),
        "p99": _percentile(ms, 0.99),
        "accepted": len(ms),
        "shed": shed,
        "other": other,
    }


async def batches(target: str, count: int, tag: str) -> float:
    """SubmitIntents, 1,000 a batch, 4 in flight; intents/s."""
    items = submissions(tag, count)
    requests = [
        ingest_pb2.SubmitIntentsRequest(intents=items[i : i + 1000]) for i in range(0, count, 1000)
    ]
    gate = asyncio.Semaphore(4)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)

        async def one(request: ingest_pb2.SubmitIntentsRequest) -> None:
            async with gate:
                while True:  # as a client should: shed calls come back after the hint
                    try:
                        reply = await stub.SubmitIntents(request, timeout=120)
                        break
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                            raise
                        await asyncio.sleep(0.2)
            assert all(r.created for r in reply.results), "not all created"

        started = time.perf_counter()
        await asyncio.gather(*(one(r) for r in requests))
        return count / (time.perf_counter() - started)


async def stream(target: str, count: int, tag: str, chunk: int = 5000) -> float:
    """One SubmitIntentStream of ``count`` intents in chunks; intents/s. Chunks are built
    as they are sent, so the client never holds the whole campaign."""

    async def chunks() -> AsyncIterator[ingest_pb2.SubmitIntentStreamRequest]:
        for n, start in enumerate(range(0, count, chunk)):
            items = submissions(f"{tag}/{n}", min(chunk, count - start))
            yield ingest_pb2.SubmitIntentStreamRequest(intents=items, chunk=n)

    created = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        started = time.perf_counter()
        async for reply in stub.SubmitIntentStream(chunks()):
            created += reply.created
        seconds = time.perf_counter() - started
    assert created == count, f"{created} of {count} created"
    return count / seconds


async def seed_style(dsn: str, count: int, tag: str) -> float:
    """One transaction and one INSERT per intent, 10 connections; intents/s."""
    rows = new_intents(tag, count)
    pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10)
    try:
        queue = iter(rows)

        async def worker() -> None:
            async with pool.acquire() as conn:
                for r in queue:
                    async with conn.transaction():
                        await conn.execute(
                            SEED_INSERT_SQL, r.id, r.idempotency_key, r.payload_hash,
                            r.campaign_id, r.recipient, r.kind, r.priority, r.template_id,
                            '{"name": "x"}', r.send_at, r.deadline,
                        )  # fmt: skip

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(10)))
        return count / (time.perf_counter() - started)
    finally:
        await pool.close()


async def one_run(
    srv: Servers, workdir: Path, args: argparse.Namespace, run: int
) -> dict[str, float]:
    providers = workdir / "providers.toml"
    providers.write_text(PROVIDERS_TOML)
    ports = {name: find_free_port() for name in ("ingest", "router", "sender")}
    figures: dict[str, float] = {}
    async with fresh_database(srv.admin_dsn) as dsn, AsyncExitStack() as stack:
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "REDIS_URL": srv.redis_url,
            "SLUICE_REDIS_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
            "SLUICE_PROVIDERS_FILE": str(providers),
            "SLUICE_INGEST_PORT": str(ports["ingest"]),
            "SLUICE_WEBHOOK_PORT": "0",  # any free port: never collide with a running Sluice
            "SLUICE_ROUTER_PORT": str(ports["router"]),
            "SLUICE_SENDER_PORT": str(ports["sender"]),
            "SLUICE_SENDER_TARGET": f"127.0.0.1:{ports['sender']}",
            "SLUICE_LOG_LEVEL": "WARNING",
        }
        services = {n: Service(n, env, workdir) for n in ports}
        for s in services.values():
            stack.push_async_callback(s.stop)
            await s.start()
        for n, s in services.items():
            await s.wait_serving(f"127.0.0.1:{ports[n]}")
        target = f"127.0.0.1:{ports['ingest']}"
        tag = f"r{run}-{uuid.uuid4().hex[:6]}"
        for rate in args.rates:
            r = await open_loop(target, rate, args.seconds, f"{tag}u{rate}")
            for k, v in r.items():
                figures[f"unary{rate}:{k}"] = v
            print(f"  run {run}: {rate}/s offered: {r}", flush=True)
        figures["batch"] = await batches(target, args.batch_count, f"{tag}b")
        print(f"  run {run}: SubmitIntents {figures['batch']:,.0f}/s", flush=True)
        figures["stream"] = await stream(target, args.stream_count, f"{tag}s")
        print(f"  run {run}: stream {figures['stream']:,.0f}/s", flush=True)
    async with fresh_database(srv.admin_dsn) as dsn:
        figures["seed"] = await seed_style(dsn, args.seed_count, f"{tag}x")
        print(f"  run {run}: seed style {figures['seed']:,.0f}/s", flush=True)
    return figures


def table(runs: list[dict[str, float]], args: argparse.Namespace) -> str:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    seed = med("seed")
    lines = [
        f"ingest bench: median of {len(runs)} run(s); unary {args.seconds:.0f} s per load,"
        f" batches {args.batch_count:,} intents, stream {args.stream_count:,} intents,"
        f" seed style {args.seed_count:,} intents",
        f"{'stage':44} {'median':>12} {'vs seed style':>14}",
    ]
    for rate in args.rates:
        p = f"unary{rate}:"
        lines.append(
            f"{f'SubmitIntent at {rate}/s offered (p50/p95/p99 ms)':44}"
            f" {med(p + 'p50'):.1f}/{med(p + 'p95'):.1f}/{med(p + 'p99'):.1f}"
        )
        lines.append(
            f"{'  accepted / shed / other errors':44}"
            f" {med(p + 'accepted'):,.0f} / {med(p + 'shed'):,.0f} / {med(p + 'other'):,.0f}"
        )
    for key, name in (
        ("batch", "SubmitIntents x1,000 (intents/s)"),
        ("stream", "SubmitIntentStream (intents/s)"),
        ("seed", "seed style, 1 tx + 1 INSERT each (intents/s)"),
    ):
        lines.append(f"{name:44} {med(key):>12,.0f} {med(key) / seed:>13.2f}x")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    with TemporaryDirectory(prefix="sluice-bench-") as tmp:
        workdir = Path(tmp)
        async with servers(workdir, lambda m: print(m, flush=True)) as srv:
            runs = [await one_run(srv, workdir, args, i + 1) for i in range(args.runs)]
    print(table(runs, args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rates", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch-count", type=int, default=50_000)
    parser.add_argument("--stream-count", type=int, default=1_000_000)
    parser.add_argument("--seed-count", type=int, default=20_000)
    asyncio.run(main(parser.parse_args()))
