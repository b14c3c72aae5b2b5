"""End-to-end throughput: ingest -> PostgreSQL -> router -> sender -> sandbox -> write-back.

One *e2e run*, on a fresh database:

1. start ``sluice serve ingest`` and ``sluice serve sender`` as subprocesses, with one
   unlimited sandbox provider (no rate limit, ``record_ids=false``);
2. submit ``count`` intents with ``SubmitIntents`` in batches of 1,000 (a few batches in
   flight) and time it: the **ingest** row;
3. start ``sluice serve router`` and time from its first lease until every intent is
   ``sent``: the **end-to-end** row. The clock starts at the first lease, not at process
   start, so Python's import time is not counted as pipeline time.

One *baseline run*, in this process on a fresh database: the same number of intents stored
with ingest's repository directly (``insert_intents``, batches of 1,000), then leased and
completed with the router's repository functions (``lease`` -> ``complete``, the router's
batch size and concurrency) with no gRPC, no sender and no Redis: what the database part of
the pipeline costs by itself, so the ratio shows what the services add.

Why subprocesses: the services are separate processes in production, and on a 2-core machine
three asyncio services in one process would share one core (the GIL) while PostgreSQL gets
the other; as processes they compete for the cores the way a real deployment does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.cli.embedded import embedded_postgres, embedded_redis, find_free_port
from sluice.cli.seed import seed_templates
from sluice.common.db import create_pool, migrate
from sluice.common.model import KIND_TO_PROTO, PRIORITY
from sluice.ingest.repository import NewIntent, insert_intents
from sluice.router.repository import Completion, complete, lease
from sluice.router.settings import RouterSettings
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, intent_pb2

SUBMIT_BATCH = 1_000
SHED_RETRY_SECONDS = 0.2  # ingest's retry hint under load is of this order
SUBMIT_IN_FLIGHT = 4  # batches in flight at once, like a few busy client processes
UNARY_COUNT = 5_000
UNARY_IN_FLIGHT = 64  # concurrent single-intent callers
START_TIMEOUT = 60.0
RUN_TIMEOUT = 600.0
FIRST_LEASE_POLL = 0.005
DONE_POLL = 0.05  # s; one EXISTS poll costs the database ~1 ms, and 50 ms is 1% of a run

PROVIDERS_TOML = """\
# Written by bench/e2e.py: one sandbox provider with no rate limit, so the pipeline itself
# is what is measured.
[[providers]]
name = "bench"
kind = "sandbox"
cost_per_thousand = 0.10
sustained_rate = 0
burst = 0
intents = ["transactional", "marketing", "digest"]
max_batch_size = 500

[providers.settings]
record_ids = false
"""

Report = Callable[[str], None]


def _kind(index: int) -> str:
    slot = index % 5
    return "transactional" if slot == 0 else "digest" if slot == 1 else "marketing"


@dataclass(frozen=True)
class Servers:
    """The PostgreSQL and Redis the bench runs against."""

    admin_dsn: str  # a database we may CREATE/DROP DATABASE from
    redis_url: str
    postgres_label: str
    redis_label: str


@dataclass
class Measurements:
    """Rates (per second) per stage, one entry per run."""

    ingest: list[float] = field(default_factory=list)
    unary: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    e2e_two_routers: list[float] = field(default_factory=list)
    steady: list[float] = field(default_factory=list)
    e2e_metrics_off: list[float] = field(default_factory=list)
    baseline_insert: list[float] = field(default_factory=list)
    baseline_pipeline: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@asynccontextmanager
async def servers(workdir: Path, report: Report) -> AsyncIterator[Servers]:
    """DATABASE_URL / REDIS_URL when set, else throwaway embedded servers."""
    dsn = os.environ.get("DATABASE_URL", "")
    redis_url = os.environ.get("REDIS_URL", "")
    async with AsyncExitStack() as stack:
        pg_label = "DATABASE_URL"
        redis_label = "REDIS_URL"
        if not dsn:
            report("DATABASE_URL unset: starting an embedded PostgreSQL (fsync off)")
            dsn = await stack.enter_async_context(embedded_postgres(workdir, log=report))
            pg_label = "embedded (fsync=off)"
        if not redis_url:
            report("REDIS_URL unset: starting an embedded Redis")
            redis_url = await stack.enter_async_context(embedded_redis(workdir, log=report))
            redis_label = "embedded"
        yield Servers(dsn, redis_url, pg_label, redis_label)


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name`` on the same server."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@asynccontextmanager
async def fresh_database(admin_dsn: str) -> AsyncIterator[str]:
    """A new, migrated database with the demo templates; dropped afterwards."""
    name = f"sluice_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(admin_dsn, name)
    try:
        await migrate(dsn)
        pool = await create_pool(dsn, max_size=2)
        try:
            await seed_templates(pool)
        finally:
            await pool.close()
        yield dsn
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def submissions(run: str, count: int) -> list[intent_pb2.IntentSubmission]:
    """``count`` valid submissions for the ``welcome`` template, mixed intent kinds."""
    return [
        intent_pb2.IntentSubmission(
            idempotency_key=f"{run}/{i}",
            campaign_id=run,
            recipient=f"user{i}@example.com",
            intent=KIND_TO_PROTO[_kind(i)],
            template_id="welcome",
            variables={"name": f"User {i}"},
        )
        for i in range(count)
    ]


def new_intents(run: str, count: int) -> list[NewIntent]:
    """The same intents as :func:`submissions`, as ingest's repository stores them."""
    now = datetime.now(UTC)
    deadline = now + timedelta(days=1)
    rows = []
    for i in range(count):
        key = f"{run}/{i}"
        kind = _kind(i)
        rows.append(
            NewIntent(
                id=uuid.uuid4(),
                idempotency_key=key,
                payload_hash=hashlib.sha256(key.encode()).digest(),
                campaign_id=run,
                recipient=f"user{i}@example.com",
                kind=kind,
                priority=PRIORITY[kind],
                template_id="welcome",
                variables={"name": f"User {i}"},
                send_at=now,
                deadline=deadline,
                traceparent=None,
            )
        )
    return rows


class Service:
    """One ``sluice serve`` subprocess, its log, and a bounded stop."""

    def __init__(self, name: str, env: dict[str, str], logdir: Path, label: str = "") -> None:
        self.name = name
        self.env = env
        self.log_path = logdir / f"{label or name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Spawns ``python -m sluice.cli serve <name>``."""
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sluice.cli",
                "serve",
                self.name,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 20) -> str:
        """The end of the service's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def wait_serving(self, target: str) -> None:
        """Until the health service answers SERVING; fails if the process exits."""
        deadline = time.monotonic() + START_TIMEOUT
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc is not None and self.proc.returncode is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the process and its live children (the sender's
        render workers), from Linux /proc."""
        if self.proc is None or self.proc.returncode is not None:
            return 0.0
        pid = self.proc.pid
        return sum(cpu for p, ppid, _, cpu in _processes() if pid in (p, ppid))

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


def _processes() -> Iterator[tuple[int, int, str, float]]:
    """(pid, parent pid, command line, CPU seconds so far) of every process we may read."""
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        yield int(entry.name), int(fields[1]), cmdline, (int(fields[11]) + int(fields[12])) / ticks


def postgres_cpu_seconds(dsn: str) -> float:
    """CPU seconds so far of the PostgreSQL backends serving ``dsn``'s database (0 when the
    server runs elsewhere): each backend's title names its database."""
    database = urlsplit(dsn).path.lstrip("/")
    return sum(
        cpu for _, _, cmd, cpu in _processes() if cmd.startswith("postgres") and database in cmd
    )


async def _submit_all(target: str, items: Sequence[intent_pb2.IntentSubmission]) -> float:
    """Submits in 1,000-item batches, SUBMIT_IN_FLIGHT at a time; returns seconds taken."""
    batches = [items[i : i + SUBMIT_BATCH] for i in range(0, len(items), SUBMIT_BATCH)]
    requests = [ingest_pb2.SubmitIntentsRequest(intents=b) for b in batches]
    gate = asyncio.Semaphore(SUBMIT_IN_FLIGHT)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = cast(
            "ingest_pb2_grpc.IngestServiceAsyncStub", ingest_pb2_grpc.IngestServiceStub(channel)
        )

        async def one(request: ingest_pb2.SubmitIntentsRequest) -> None:
            async with gate:
                while True:
                    try:
                        answer: ingest_pb2.SubmitIntentsResponse = await stub.SubmitIntents(
                            request, timeout=120
                        )
                    except grpc.aio.AioRpcError as exc:
                        # Shed at capacity: retry after the hint, as a well-behaved client.
                        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                            raise
                        await asyncio.sleep(SHED_RETRY_SECONDS)
                        continue
                    break
            bad = [r.error.message for r in answer.results if not r.intent_id or not r.created]
            if bad:
                raise RuntimeError(f"{len(bad)} submissions not created, e.g. {bad[0]}")

        started = time.perf_counter()
        await asyncio.gather(*(one(r) for r in requests))
        return time.perf_counter() - started


async def _submit_unary(
    target: str, items: Sequence[intent_pb2.IntentSubmission], in_flight: int
) -> float:
    """One SubmitIntent call per item, ``in_flight`` at a time; returns seconds taken.

    Many clients sending one intent each is how most services will call ingest; its
    coalescer turns concurrent calls into batched inserts.
    """
    queue = list(reversed(items))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = cast(
            "ingest_pb2_grpc.IngestServiceAsyncStub", ingest_pb2_grpc.IngestServiceStub(channel)
        )

        async def client() -> None:
            while queue:
                item = queue.pop()
                answer: ingest_pb2.SubmitIntentResponse = await stub.SubmitIntent(
                    ingest_pb2.SubmitIntentRequest(intent=item), timeout=60
                )
                if not answer.created:
                    raise RuntimeError(f"{item.idempotency_key} was not created")

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(in_flight)))
        return time.perf_counter() - started


# The polls must cost the database next to nothing: on 2 cores a count(*) of the open rows
# every 20 ms took most of a core from the pipeline it was timing. Each EXISTS stops at the
# first live entry of a partial index.
ANY_OPEN_SQL = """
SELECT EXISTS (SELECT 1 FROM intents WHERE status = 'pending')
    OR EXISTS (SELECT 1 FROM intents WHERE status = 'leased')
"""
ANY_LEASED_SQL = "SELECT EXISTS (SELECT 1 FROM intents WHERE status = 'leased')"


async def _wait_drained(conn: asyncpg.Connection[Any]) -> float:
    """Polls until nothing is pending or leased; returns that time (perf_counter)."""
    deadline = time.perf_counter() + RUN_TIMEOUT
    while await conn.fetchval(ANY_OPEN_SQL):
        if time.perf_counter() > deadline:
            raise RuntimeError(f"intents still open after {RUN_TIMEOUT:.0f} s")
        await asyncio.sleep(DONE_POLL)
    return time.perf_counter()


async def _wait_pipeline(conn: asyncpg.Connection[Any]) -> tuple[float, float]:
    """Polls until the first lease, then until nothing is pending or leased.

    Returns (first-lease time, done time) on the perf_counter clock. A lease holds its rows
    for a whole round (tens of milliseconds), so a 5 ms poll sees the first one.
    """
    deadline = time.perf_counter() + RUN_TIMEOUT
    while True:
        if await conn.fetchval(ANY_LEASED_SQL):
            first = time.perf_counter()
            break
        if time.perf_counter() > deadline:
            raise RuntimeError("the router never leased anything")
        await asyncio.sleep(FIRST_LEASE_POLL)
    return first, await _wait_drained(conn)


async def e2e_run(
    servers_: Servers, count: int, workdir: Path, report: Report, *, metrics: bool = True
) -> E2eRun:
    """One end-to-end run: ingest alone, 1 router, then (with metrics on) 2 routers and
    ingest while sending. ``metrics=False`` runs the services with metrics off
    (``SLUICE_METRICS_PORT=-1``: nothing recorded, nothing served), for their cost, and
    stops after the 1-router row."""
    providers_file = workdir / "providers.toml"
    providers_file.write_text(PROVIDERS_TOML)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    ports = {name: find_free_port() for name in ("ingest", "router", "sender")}
    async with fresh_database(servers_.admin_dsn) as dsn, AsyncExitStack() as stack:
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "REDIS_URL": servers_.redis_url,
            "SLUICE_REDIS_PREFIX": prefix,
            "SLUICE_PROVIDERS_FILE": str(providers_file),
            "SLUICE_LISTEN_HOST": "127.0.0.1",
            "SLUICE_INGEST_PORT": str(ports["ingest"]),
            "SLUICE_WEBHOOK_PORT": "0",  # any free port: never collide with a running Sluice
            "SLUICE_ROUTER_PORT": str(ports["router"]),
            "SLUICE_SENDER_PORT": str(ports["sender"]),
            "SLUICE_SENDER_TARGET": f"127.0.0.1:{ports['sender']}",
            "SLUICE_LOG_LEVEL": "WARNING",
        }
        services = {
            name: Service(
                name,
                {**env, "SLUICE_METRICS_PORT": str(find_free_port() if metrics else -1)},
                workdir,
            )
            for name in ports
        }
        for service in services.values():
            stack.push_async_callback(service.stop)
        stack.push_async_callback(_drop_redis_keys, servers_.redis_url, prefix)
        await asyncio.gather(services["ingest"].start(), services["sender"].start())
        await asyncio.gather(
            services["ingest"].wait_serving(f"127.0.0.1:{ports['ingest']}"),
            services["sender"].wait_serving(f"127.0.0.1:{ports['sender']}"),
        )
        items = submissions(prefix, count)
        seconds = await _submit_all(f"127.0.0.1:{ports['ingest']}", items)
        ingest_rate = count / seconds
        report(f"  ingest: {count:,} intents in {seconds:.2f} s = {ingest_rate:,.0f}/s")
        # Before the router starts, like the batched phase: ingest measured alone.
        unary_items = submissions(f"{prefix}u", UNARY_COUNT)
        ingest_cpu = services["ingest"].cpu_seconds()
        client_cpu = time.process_time()
        seconds = await _submit_unary(f"127.0.0.1:{ports['ingest']}", unary_items, UNARY_IN_FLIGHT)
        unary_rate = UNARY_COUNT / seconds
        report(
            f"  ingest unary: {UNARY_COUNT:,} SubmitIntent calls, {UNARY_IN_FLIGHT} in flight, "
            f"in {seconds:.2f} s = {unary_rate:,.0f}/s (CPU s: ingest "
            f"{services['ingest'].cpu_seconds() - ingest_cpu:.1f}, "
            f"client {time.process_time() - client_cpu:.1f})"
        )
        total = count + UNARY_COUNT

        conn = await asyncpg.connect(dsn)
        stack.push_async_callback(conn.close)
        cpu_before = {n: s.cpu_seconds() for n, s in services.items()}
        cpu_before["postgres"] = postgres_cpu_seconds(dsn)
        await services["router"].start()
        first, done = await _wait_pipeline(conn)
        cpu = {n: s.cpu_seconds() - cpu_before[n] for n, s in services.items()}
        cpu["postgres"] = postgres_cpu_seconds(dsn) - cpu_before["postgres"]
        sent = await conn.fetchval("SELECT count(*) FROM intents WHERE status = 'sent'")
        if sent != total:
            raise RuntimeError(f"only {sent} of {total} intents were sent")
        e2e_rate = total / (done - first)
        cpu_note = ", ".join(
            f"{n} {c:.1f} ({c / total * 1e6:.0f} µs/email)" for n, c in cpu.items()
        )
        report(
            f"  end-to-end: {total:,} sent in {done - first:.2f} s from first lease = "
            f"{e2e_rate:,.0f} emails/s (CPU s: {cpu_note})"
        )

        if not metrics:
            return E2eRun(ingest_rate, e2e_rate, unary_rate, cpu_note, 0.0, 0.0)

        # Two routers: stop the first, queue another `count`, start both, time the drain.
        await services["router"].stop()
        await _submit_all(f"127.0.0.1:{ports['ingest']}", submissions(f"{prefix}r2", count))
        routers = [services["router"]]
        second_env = {
            **services["router"].env,
            "SLUICE_ROUTER_PORT": str(find_free_port()),
            "SLUICE_METRICS_PORT": str(find_free_port()),
        }
        routers.append(Service("router", second_env, workdir, label="router2"))
        stack.push_async_callback(routers[1].stop)
        await asyncio.gather(*(r.start() for r in routers))
        first, done = await _wait_pipeline(conn)
        two_rate = count / (done - first)
        report(
            f"  end-to-end, 2 routers: {count:,} sent in {done - first:.2f} s = {two_rate:,.0f}/s"
        )

        # Steady state: both routers running while ingest takes `count` more; timed from the
        # first submission until the last of them is sent.
        started = time.perf_counter()
        await _submit_all(f"127.0.0.1:{ports['ingest']}", submissions(f"{prefix}st", count))
        done = await _wait_drained(conn)
        steady_rate = count / (done - started)
        report(
            f"  steady state, ingest while sending (2 routers): {count:,} submitted and sent "
            f"in {done - started:.2f} s = {steady_rate:,.0f}/s"
        )
        return E2eRun(ingest_rate, e2e_rate, unary_rate, cpu_note, two_rate, steady_rate)


@dataclass(frozen=True)
class E2eRun:
    """The rates one e2e run measured (per second)."""

    ingest: float
    e2e: float
    unary: float
    cpu_note: str
    e2e_two_routers: float
    steady: float


async def _drop_redis_keys(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def baseline_run(servers_: Servers, count: int, report: Report) -> tuple[float, float]:
    """The database part alone; returns (inserts/s, leased-and-completed/s)."""
    settings = RouterSettings.from_env()
    workers = settings.router_concurrency
    async with fresh_database(servers_.admin_dsn) as dsn:
        pool = await create_pool(dsn, min_size=workers, max_size=max(workers, SUBMIT_IN_FLIGHT))
        try:
            rows = new_intents(f"base{uuid.uuid4().hex[:8]}", count)
            batches = [rows[i : i + SUBMIT_BATCH] for i in range(0, len(rows), SUBMIT_BATCH)]
            gate = asyncio.Semaphore(SUBMIT_IN_FLIGHT)

            async def insert(batch: list[NewIntent]) -> None:
                async with gate:
                    await insert_intents(pool, batch)

            started = time.perf_counter()
            await asyncio.gather(*(insert(b) for b in batches))
            insert_rate = count / (time.perf_counter() - started)

            async def worker() -> None:
                while True:
                    lease_id = uuid.uuid4()
                    leased = await lease(
                        pool,
                        lease_id=lease_id,
                        limit=settings.router_batch_size,
                        lease_seconds=settings.lease_seconds,
                    )
                    if not leased:
                        return
                    await complete(
                        pool,
                        lease_id=lease_id,
                        completions=[
                            Completion(
                                intent_id=i.id,
                                status="sent",
                                provider="bench",
                                provider_message_id=f"bench-{i.id}",
                                attempted=True,
                            )
                            for i in leased
                        ],
                    )

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(workers)))
            pipeline_rate = count / (time.perf_counter() - started)
            sent = await pool.fetchval("SELECT count(*) FROM intents WHERE status = 'sent'")
            if sent != count:
                raise RuntimeError(f"baseline completed {sent} of {count}")
        finally:
            await pool.close()
    report(
        f"  baseline: insert_intents {insert_rate:,.0f}/s; lease->complete "
        f"({workers} workers x {settings.router_batch_size}) {pipeline_rate:,.0f}/s"
    )
    return insert_rate, pipeline_rate


async def measure(count: int, runs: int, report: Report) -> tuple[Measurements, Servers]:
    """Runs ``runs`` e2e runs and ``runs`` baseline runs, interleaved."""
    results = Measurements()
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        workdir = Path(tmp)
        async with servers(workdir, report) as servers_:
            report(f"PostgreSQL: {servers_.postgres_label}; Redis: {servers_.redis_label}")
            for run in range(1, runs + 1):
                report(f"run {run}/{runs}: end to end ({count:,} intents, services as processes)")
                one = await e2e_run(servers_, count, workdir, report)
                results.ingest.append(one.ingest)
                results.unary.append(one.unary)
                results.e2e.append(one.e2e)
                results.e2e_two_routers.append(one.e2e_two_routers)
                results.steady.append(one.steady)
                results.notes.append(f"run {run} CPU s during send (1 router): {one.cpu_note}")
                report(f"run {run}/{runs}: end to end again with metrics off")
                off = await e2e_run(servers_, count, workdir, report, metrics=False)
                results.e2e_metrics_off.append(off.e2e)
                report(f"run {run}/{runs}: baseline (bare database pipeline, in process)")
                insert_rate, pipeline_rate = await baseline_run(servers_, count, report)
                results.baseline_insert.append(insert_rate)
                results.baseline_pipeline.append(pipeline_rate)
    return results, servers_


def median(values: Sequence[float]) -> float:
    """The median (the middle run of 3)."""
    return float(statistics.median(values))
