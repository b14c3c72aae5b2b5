"""``python -m bench.limiter``: the sender's limiter and renderer, measured (median of N runs).

Rows:
  reservations/s    RateLimiter.acquire calls against one provider with both message
                    limits on, 50 tasks in one process, then 50 tasks in each of 4 processes
  accuracy          4 processes x 20 tasks hammer one provider (50/s sustained, burst 100)
                    with a permanent backlog; every grant is stamped with Redis TIME.
                    "max in 1 s" is the most granted in any one-second window (the burst
                    allows 100); "use" is granted / (burst + 50/s x run): at most 100 %
  naive bucket      the same load on a GET-then-SET counter (read tokens, write tokens - n
                    with a 1 s expiry; no atomicity, no refill, no burst window): the
                    scheme the limiter replaces, for how far it overshoots
  render            messages/s rendered through the worker pool (batches of 100) against
                    the same renderer called in this process (baseline)

Uses REDIS_URL (default redis://127.0.0.1:6379/0); keys live under a random prefix and are
deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from sluice.common.providers import ProviderConfig
from sluice.sender.ratelimit import RateLimiter
from sluice.sender.render import Renderer, Template
from sluice.sender.render_pool import RenderPool

RATE, BURST = 50.0, 100
TEMPLATE = Template(
    "bench",
    1,
    "Hi {{ name }}",
    "<p>Hello {{ name }}, {{ offer }}</p>",
    "Hello {{ name }}",
    ("name", "offer"),
    "noreply@example.com",
)


def provider(name: str, rate: float, burst: int) -> ProviderConfig:
    return ProviderConfig(
        name=name,
        kind="sandbox",
        cost_per_thousand=0.1,
        sustained_rate=rate,
        burst=burst,
        intents=frozenset({"marketing"}),
    )


# --- workers (run in this process or in spawned ones) -----------------------------------


async def _throughput(url: str, prefix: str, name: str, tasks: int, seconds: float) -> int:
    client = aioredis.Redis.from_url(url)
    limiter = RateLimiter(client, prefix)
    p = provider(name, 1e9, 1_000_000_000)
    end = time.monotonic() + seconds
    count = 0

    async def one() -> None:
        nonlocal count
        while time.monotonic() < end:
            await limiter.acquire(p, [1])
            count += 1

    try:
        await asyncio.gather(*(one() for _ in range(tasks)))
    finally:
        await client.aclose()
    return count


async def _naive_acquire(client: aioredis.Redis, key: str, n: int) -> int:
    raw = await client.get(key)
    tokens = int(RATE) if raw is None else int(raw)
    if tokens < n:
        return 0
    await client.set(key, tokens - n, ex=1)
    return n


async def _hammer(
    url: str, prefix: str, name: str, naive: bool, tasks: int, start_at: float, end_at: float
) -> list[tuple[int, int]]:
    """Grants as (Redis time µs, n), with a backlog in every task."""
    client = aioredis.Redis.from_url(url)
    limiter = RateLimiter(client, prefix)
    p = provider(name, RATE, BURST)
    key = f"{prefix}:naive:{{{name}}}"
    out: list[tuple[int, int]] = []

    async def one() -> None:
        while time.time() < end_at:
            n = random.randint(1, 8)
            if naive:
                granted = await _naive_acquire(client, key, n)
                sec, usec = await client.time()
                if granted:
                    out.append((sec * 1_000_000 + usec, granted))
                else:
                    await asyncio.sleep(random.uniform(0.005, 0.02))
                continue
            grant = await limiter.acquire(p, [n])
            if grant.granted:
                out.append((grant.at_us, grant.granted))
            if grant.granted < n:
                await asyncio.sleep(grant.retry_after + random.uniform(0, 0.002))

    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*(one() for _ in range(tasks)))
    finally:
        await client.aclose()
    return out


def _in_process(job: tuple[str, tuple[Any, ...]]) -> Any:
    kind, args = job
    if kind == "throughput":
        return asyncio.run(_throughput(*args))
    return asyncio.run(_hammer(*args))


def _parallel(
    make_jobs: Callable[[], Sequence[tuple[str, tuple[Any, ...]]]], processes: int
) -> list[Any]:
    """Runs the jobs in ``processes`` spawned interpreters, built once all have started
    (so a start time in the jobs is not eaten by interpreter start-up on a busy box)."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(time.sleep, [0.3] * processes, chunksize=1)
        return pool.map(_in_process, make_jobs(), chunksize=1)


# --- measurements -----------------------------------------------------------------------


@dataclass
class Accuracy:
    max_in_second: int
    use: float  # granted / what the limits allow over the run


def max_in_window(events: list[tuple[int, int]], width_us: int = 1_000_000) -> int:
    events = sorted(events)
    best = total = start = 0
    for t, n in events:
        total += n
        while events[start][0] <= t - width_us:
            total -= events[start][1]
            start += 1
        best = max(best, total)
    return best


def accuracy(url: str, naive: bool, seconds: float, processes: int = 4) -> Accuracy:
    prefix, name = f"bench{uuid.uuid4().hex[:8]}", "acc"

    def jobs() -> list[tuple[str, tuple[Any, ...]]]:
        start_at = time.time() + 0.5
        job = ("hammer", (url, prefix, name, naive, 20, start_at, start_at + seconds))
        return [job] * processes

    grants = [g for out in _parallel(jobs, processes) for g in out]
    asyncio.run(_cleanup(url, prefix))
    total = sum(n for _, n in grants)
    span = (max(t for t, _ in grants) - min(t for t, _ in grants)) / 1e6
    return Accuracy(max_in_window(grants), total / (BURST + RATE * span))


async def _cleanup(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def reservations(url: str, processes: int, seconds: float) -> float:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    job = ("throughput", (url, prefix, "tp", 50, seconds))
    counts = (
        [_in_process(job)] if processes == 1 else _parallel(lambda: [job] * processes, processes)
    )
    asyncio.run(_cleanup(url, prefix))
    return sum(counts) / seconds


async def render_rates(batches: int) -> tuple[float, float]:
    variables = [{"name": f"user{i}", "offer": "20% off"} for i in range(100)]
    renderer = Renderer()
    started = time.perf_counter()
    for _ in range(batches):
        for v in variables:
            renderer.render(TEMPLATE, v)
    local = batches * 100 / (time.perf_counter() - started)
    pool = RenderPool(1)
    try:
        await pool.start()
        await pool.render(TEMPLATE, variables)
        started = time.perf_counter()
        for _ in range(batches):
            await pool.render(TEMPLATE, variables)
        pooled = batches * 100 / (time.perf_counter() - started)
    finally:
        await pool.aclose()
    return pooled, local


def _cells(values: list[float], fmt: Callable[[float], str]) -> list[str]:
    return [fmt(statistics.median(values)), fmt(min(values)), fmt(max(values))]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.limiter")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="per accuracy run")
    parser.add_argument("--redis", default="")
    args = parser.parse_args(argv)
    import os

    url = args.redis or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    one, four, lua, naive, pooled, local = [], [], [], [], [], []
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}", flush=True)
        one.append(reservations(url, 1, 3.0))
        four.append(reservations(url, 4, 3.0))
        lua.append(accuracy(url, naive=False, seconds=args.seconds))
        naive.append(accuracy(url, naive=True, seconds=args.seconds))
        p, loc = asyncio.run(render_rates(50))
        pooled.append(p)
        local.append(loc)

    table = Table(title=f"Sluice limiter bench: median of {args.runs} run(s)")
    for col in ("stage", "unit", "median", "min", "max", "ratio vs baseline"):
        table.add_column(col, justify="left" if col in ("stage", "unit") else "right")
    rate = lambda v: f"{v:,.0f}"  # noqa: E731 (a one-line formatter)
    pct = lambda v: f"{v:.1%}"  # noqa: E731
    table.add_row(
        "limiter acquire, 1 process x 50 tasks",
        "reservations/s",
        *_cells(one, rate),
        "1.00x (baseline)",
    )
    table.add_row(
        "limiter acquire, 4 processes x 50 tasks",
        "reservations/s",
        *_cells(four, rate),
        f"{statistics.median(four) / statistics.median(one):.2f}x",
    )
    table.add_row(
        "Lua limiter, 4 proc: max in any 1 s",
        "messages (burst 100)",
        *_cells([float(a.max_in_second) for a in lua], rate),
        "",
    )
    table.add_row(
        "Lua limiter, 4 proc: use of the limits",
        "granted / allowed",
        *_cells([a.use for a in lua], pct),
        "",
    )
    table.add_row(
        "naive GET-then-SET, 4 proc: max in any 1 s",
        "messages (burst 100)",
        *_cells([float(a.max_in_second) for a in naive], rate),
        f"{statistics.median([a.max_in_second for a in naive]) / BURST:.2f}x burst",
    )
    table.add_row(
        "naive GET-then-SET, 4 proc: granted",
        "granted / allowed",
        *_cells([a.use for a in naive], pct),
        "",
    )
    table.add_row(
        "render through the worker pool, 100/batch",
        "messages/s",
        *_cells(pooled, rate),
        f"{statistics.median(pooled) / statistics.median(local):.2f}x in-process",
    )
    table.add_row("render in this process (baseline)", "messages/s", *_cells(local, rate), "1.00x")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
