"""Hammers one provider's limiter from a separate process; prints its grants as JSON.

Run by test_sender_ratelimit.py: argv = redis_url prefix provider rate burst tasks. It
prints "ready", reads "<start_at> <end_at>" (wall-clock seconds) from stdin, hammers in
that interval, then prints one JSON line: [[redis_time_us, granted], ...].
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

import redis.asyncio as aioredis

from sluice.common.providers import ProviderConfig
from sluice.sender.ratelimit import RateLimiter


async def hammer(
    limiter: RateLimiter, provider: ProviderConfig, end_at: float, out: list[list[int]]
) -> None:
    """Asks for a few sends at a time until end_at, sleeping retry_after when throttled."""
    while time.time() < end_at:
        n = random.randint(1, 8)
        grant = await limiter.acquire(provider, [n])
        if grant.granted:
            out.append([grant.at_us, grant.granted])
        if grant.granted < n:
            # A little jitter, as real senders have; without it every task wakes together.
            await asyncio.sleep(grant.retry_after + random.uniform(0, 0.002))
        else:
            await asyncio.sleep(random.uniform(0, 0.003))


async def run(
    url: str, prefix: str, provider: ProviderConfig, tasks: int, start_at: float, end_at: float
) -> list[list[int]]:
    """Starts ``tasks`` hammering coroutines at start_at and returns every grant they got."""
    client = aioredis.Redis.from_url(url)
    try:
        limiter = RateLimiter(client, prefix)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        out: list[list[int]] = []
        await asyncio.gather(*(hammer(limiter, provider, end_at, out) for _ in range(tasks)))
        return out
    finally:
        await client.aclose()


async def serve(url: str, prefix: str, provider: ProviderConfig, tasks: int) -> list[list[int]]:
    """Says "ready" once connected, then reads "<start_at> <end_at>" from stdin and runs."""
    client = aioredis.Redis.from_url(url)
    try:
        await client.ping()
    finally:
        await client.aclose()
    print("ready", flush=True)
    start_at, end_at = (float(v) for v in sys.stdin.readline().split())
    return await run(url, prefix, provider, tasks, start_at, end_at)


def main() -> None:
    url, prefix, name, rate, burst, tasks = sys.argv[1:7]
    provider = ProviderConfig(
        name=name,
        kind="sandbox",
        cost_per_thousand=0.1,
        sustained_rate=float(rate),
        burst=int(burst),
        intents=frozenset({"marketing"}),
    )
    grants = asyncio.run(serve(url, prefix, provider, int(tasks)))
    print(json.dumps(grants), flush=True)


if __name__ == "__main__":
    main()
