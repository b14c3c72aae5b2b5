"""``python -m bench.shared_state``: what the router's per-round sync of shared circuits and
outage clocks costs (:meth:`sluice.router.shared_state.SharedState.sync`), against one bare
Redis round trip (``PING``) measured in the same process.

Each sync carries the samples of two batches per provider (what a busy round gathers) for
the default providers, so it runs the full script: bucket update, window sums, state read,
for every provider and the sender, plus the router count. Wall time per call on loopback,
median of ``--runs`` runs of ``--syncs`` calls each; with a 500-intent lease per round, the
cost per intent is the sync divided by 500. Uses ``REDIS_URL`` (default 127.0.0.1:6379)
under a key prefix of its own, deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence

import redis.asyncio as aioredis

from sluice.common.providers import DEFAULT_PROVIDERS
from sluice.router.outcomes import SENDER_TARGET
from sluice.router.provider_state import OutageClock
from sluice.router.settings import RouterSettings
from sluice.router.shared_state import SharedState

LEASE = 500


async def _run(syncs: int, runs: int) -> tuple[float, float]:
    redis = aioredis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    settings = RouterSettings(redis_prefix=prefix)
    clock = OutageClock(probe_interval=0.5, hold_max=30.0, rng=random.Random(1))
    state = SharedState(
        redis,
        prefix,
        {p.name: p.intents for p in DEFAULT_PROVIDERS},
        [SENDER_TARGET],
        settings.circuit(),
        probe_interval=0.5,
        hold_max=30.0,
        router_id="bench",
        outages=clock,
    )
    kinds = ("transactional", "marketing", "digest")
    pings: list[float] = []
    rounds: list[float] = []
    try:
        for _ in range(runs):
            started = time.perf_counter()
            for _ in range(syncs):
                await redis.ping()
            pings.append((time.perf_counter() - started) * 1e6 / syncs)
            started = time.perf_counter()
            for n in range(syncs):
                for p in DEFAULT_PROVIDERS:
                    for kind in sorted(p.intents)[:2]:
                        state.record(p.name, kind, ok=250, failed=n % 2, seconds=0.01)
                assert await state.sync(kinds) is not None
            rounds.append((time.perf_counter() - started) * 1e6 / syncs)
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
    return statistics.median(pings), statistics.median(rounds)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints µs per PING and per sync (median), their ratio, and the cost per intent."""
    parser = argparse.ArgumentParser(prog="python -m bench.shared_state")
    parser.add_argument("--syncs", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    ping, sync = asyncio.run(_run(args.syncs, args.runs))
    print(f"shared state sync, {len(DEFAULT_PROVIDERS)} providers + sender, median of {args.runs}:")
    print(f"  Redis PING round trip (baseline): {ping:8.1f} µs")
    print(f"  sync with two batches' samples:   {sync:8.1f} µs  ({sync / ping:.1f}x)")
    print(f"  per intent of a {LEASE}-intent lease:  {sync / LEASE:8.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
