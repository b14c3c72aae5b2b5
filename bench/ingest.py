"""``python -m bench.ingest``: ingest's front door, measured (a table, median of N runs).

Rows, each run against a fresh database and real ``sluice serve`` processes:
- unary SubmitIntent, with ingest, router and sender running (the router leasing and the
  sender sending what ingest takes), at fixed offered loads (``--rates``, 500 and
  2,000/s), open loop: a call starts every 1/rate s whether or not earlier ones finished,
  so queueing shows in the latency. p50/p95/p99 of the accepted calls, and every outcome
  counted: OK,
  RESOURCE_EXHAUSTED with a RetryInfo hint (shed at once), and anything else by code
  (CANCELLED is what gRPC core answers for calls it gave up holding). Beside each, the CPU
  each party spent per offered call (ingest; router and sender with the render workers; this
  process, the load generator; ingest's database's PostgreSQL backends), from /proc: on a
  small machine they share the cores, and the tail follows their sum;
- the same unary load with the router and sender stopped (``--alone-rate``, 500/s): what
  ingest answers with the cores to itself, the load generator and PostgreSQL;
- SubmitIntents, 1,000 per batch, 4 batches in flight: intents/s (router and sender
  stopped first: ingest and the database alone, as in the baselines);
- SubmitIntentStream, one stream of chunks: intents/s for a campaign of --stream-count;
- two baselines straight to PostgreSQL, no gRPC: the seed's style (one transaction and one
  INSERT per intent, 10 connections; the ratios are against it) and ingest's own
  ``insert_intents`` in batches of 1,000, 4 at once (what the database alone takes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from tempfile import TemporaryDirectory

import asyncpg
import grpc
from google.rpc import error_details_pb2, status_pb2

from bench.e2e import (
    PROVIDERS_TOML,
    Servers,
    Service,
    fresh_database,
    new_intents,
    postgres_cpu_seconds,
    servers,
    submissions,
)
from sluice.cli.embedded import find_free_port
from sluice.ingest.repository import insert_intents
from sluice.v1 import ingest_pb2, ingest_pb2_grpc

OK, HINTED = "OK", "RESOURCE_EXHAUSTED+RetryInfo"


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _has_retry_info(exc: grpc.aio.AioRpcError) -> bool:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            return any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
    return False


def _outcome(exc: grpc.aio.AioRpcError) -> str:
    code = exc.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _has_retry_info(exc):
        return HINTED
    return code.name


async def open_loop(target: str, rate: float, seconds: float, tag: str) -> dict[str, float]:
    """Offers ``rate`` SubmitIntent calls/s for ``seconds``; latencies of accepted calls
    and the count of every outcome."""
    items = submissions(tag, int(rate * seconds) + 1)
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        await stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=items[0]))  # warm up

        async def one(item: object) -> None:
            started = time.perf_counter()
            try:
                await stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=item), timeout=30)
            except grpc.aio.AioRpcError as exc:
                outcomes[_outcome(exc)] += 1
                return
            latencies.append(time.perf_counter() - started)
            outcomes[OK] += 1

        tasks = []
        start = time.perf_counter()
        for i, item in enumerate(items[1:], 1):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(item)))
        await asyncio.gather(*tasks)
    ms = [x * 1000 for x in latencies]
    other = sum(n for k, n in outcomes.items() if k not in (OK, HINTED))
    if other:
        print(f"    other outcomes at {rate}/s: {dict(outcomes)}", flush=True)
    return {
        "p50": _percentile(ms, 0.50),
        "p95": _percentile(ms, 0.95),
        "p99": _percentile(ms, 0.99),
        "ok": outcomes[OK],
        "shed": outcomes[HINTED],
        "cancelled": outcomes["CANCELLED"],
        "other": other - outcomes["CANCELLED"],
    }


def _cpu_now(services: dict[str, Service], dsn: str) -> dict[str, float]:
    """CPU seconds so far of each party to a unary call (see the module docstring)."""
    return {
        "ingest": services["ingest"].cpu_seconds(),
        "router+sender": services["router"].cpu_seconds() + services["sender"].cpu_seconds(),
        "client": time.process_time(),  # this process, as bench.e2e counts its client
        "postgres": postgres_cpu_seconds(dsn),
    }


async def measured_loop(
    services: dict[str, Service], dsn: str, target: str, rate: float, seconds: float, tag: str
) -> dict[str, float]:
    """:func:`open_loop`, plus each party's CPU per offered call (ms)."""
    before = _cpu_now(services, dsn)
    figures = await open_loop(target, rate, seconds, tag)
    after = _cpu_now(services, dsn)
    calls = int(rate * seconds)
    for party, cpu in after.items():
        figures[f"cpu:{party}"] = (cpu - before[party]) / calls * 1000
    return figures


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
    """One transaction and one INSERT per intent, 10 connections; intents/s. The INSERT is
    today's (it claims the key in intent_keys, then writes the partitioned row)."""
    rows = new_intents(tag, count)
    pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10)
    try:
        queue = iter(rows)

        async def worker() -> None:
            async with pool.acquire() as conn:
                for r in queue:
                    async with conn.transaction():
                        await insert_intents(conn, [r])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(10)))
        return count / (time.perf_counter() - started)
    finally:
        await pool.close()


async def bare_insert(dsn: str, count: int, tag: str) -> float:
    """ingest's insert_intents, 1,000 rows a call, 4 calls at once; intents/s."""
    rows = new_intents(tag, count)
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=4)
    try:
        gate = asyncio.Semaphore(4)

        async def one(batch: Sequence[object]) -> None:
            async with gate:
                await insert_intents(pool, batch)  # type: ignore[arg-type]

        started = time.perf_counter()
        await asyncio.gather(*(one(rows[i : i + 1000]) for i in range(0, count, 1000)))
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
            r = await measured_loop(services, dsn, target, rate, args.seconds, f"{tag}u{rate}")
            for k, v in r.items():
                figures[f"unary{rate}:{k}"] = v
            print(f"  run {run}: {rate}/s offered: {_brief(r)}", flush=True)
        # The batch rows measure ingest against the database alone, as the baselines do:
        # on a 2-core machine a router and sender draining the queue take the CPU they
        # would measure.
        await services["router"].stop()
        await services["sender"].stop()
        if args.alone_rate:
            rate = args.alone_rate
            r = await measured_loop(services, dsn, target, rate, args.seconds, f"{tag}a{rate}")
            for k, v in r.items():
                figures[f"alone:{k}"] = v
            print(f"  run {run}: {rate}/s offered, ingest alone: {_brief(r)}", flush=True)
        figures["batch"] = await batches(target, args.batch_count, f"{tag}b")
        print(f"  run {run}: SubmitIntents {figures['batch']:,.0f}/s", flush=True)
        if args.stream_count:
            figures["stream"] = await stream(target, args.stream_count, f"{tag}s")
            print(f"  run {run}: stream {figures['stream']:,.0f}/s", flush=True)
    async with fresh_database(srv.admin_dsn) as dsn:
        figures["seed"] = await seed_style(dsn, args.seed_count, f"{tag}x")
        print(f"  run {run}: seed style {figures['seed']:,.0f}/s", flush=True)
        figures["bare"] = await bare_insert(dsn, args.batch_count, f"{tag}y")
        print(f"  run {run}: bare insert {figures['bare']:,.0f}/s", flush=True)
    return figures


def _brief(figures: dict[str, float]) -> str:
    return ", ".join(
        f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
    )


def table(runs: list[dict[str, float]], args: argparse.Namespace) -> str:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    seed, bare = med("seed"), med("bare")
    alone = ", then ingest alone" if args.alone_rate else ""
    lines = [
        f"ingest bench: median of {len(runs)} run(s); unary {args.seconds:.0f} s per load"
        f" (router and sender running{alone}); batches {args.batch_count:,} intents and stream"
        f" {args.stream_count:,} (ingest alone); seed style {args.seed_count:,} intents",
        f"{'stage':48} {'median':>16} {'vs seed style':>14}",
    ]
    unary = [(f"unary{rate}:", f"SubmitIntent at {rate:,}/s offered", True) for rate in args.rates]
    if args.alone_rate:
        unary.append(("alone:", f"SubmitIntent at {args.alone_rate:,}/s, ingest alone", False))
    for p, name, full in unary:
        latency = f"{med(p + 'p50'):.1f}/{med(p + 'p95'):.1f}/{med(p + 'p99'):.1f}"
        answered = f"{med(p + 'ok'):,.0f} / {med(p + 'shed'):,.0f}"
        lost = f"{med(p + 'cancelled'):,.0f} / {med(p + 'other'):,.0f}"
        parties = ["ingest", "router+sender", "client", "postgres"]
        if not full:
            parties.remove("router+sender")
        cpu = " / ".join(f"{med(f'{p}cpu:{party}'):.2f}" for party in parties)
        short = "/".join(party.replace("postgres", "pg") for party in parties)
        runs_p95 = ", ".join(f"{r[p + 'p95']:.1f}" for r in runs)
        lines.append(f"{name + ', p50/p95/p99 ms':48} {latency:>16}")
        lines.append(f"{'  p95 of each run, ms':48} {runs_p95:>16}")
        lines.append(f"{'  OK / RESOURCE_EXHAUSTED+RetryInfo':48} {answered:>16}")
        lines.append(f"{'  CANCELLED / any other code':48} {lost:>16}")
        lines.append(f"{'  CPU ms per offered call, ' + short:48} {cpu:>22}")
    rows = [("batch", "SubmitIntents x1,000, 4 in flight (intents/s)")]
    if args.stream_count:
        rows.append(("stream", "SubmitIntentStream (intents/s)"))
    rows += [
        ("bare", "bare insert_intents x1,000, 4 at once (/s)"),
        ("seed", "seed style, 1 tx + 1 INSERT each (intents/s)"),
    ]
    for key, name in rows:
        lines.append(f"{name:48} {med(key):>16,.0f} {med(key) / seed:>13.2f}x")
    lines.append(f"{'SubmitIntents x1,000 vs bare insert':48} {med('batch') / bare:>16.2f}x")
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
    parser.add_argument(
        "--alone-rate", type=int, default=500, help="unary load with ingest alone; 0: no such row"
    )
    parser.add_argument("--batch-count", type=int, default=50_000)
    parser.add_argument("--stream-count", type=int, default=1_000_000, help="0: no stream row")
    parser.add_argument("--seed-count", type=int, default=20_000)
    asyncio.run(main(parser.parse_args()))
