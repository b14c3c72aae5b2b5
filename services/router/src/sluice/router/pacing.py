"""Throttle pacing: throttled intents come back spread at their provider's rate.

Without it, every throttled intent of a lease comes back at the same retry-after: a backlog
of N intents for a provider sending S per second is leased and written back about once a
second each, N rows of churn per second for S sent. A pacer keeps a "next free slot" per
provider; each throttled intent is due one slot after the previous one, behind the sender's
retry-after, so an intent comes back about when there is room for it. Slots come
``headroom`` times faster than the provider's sustained rate: at exactly its rate any
intent that arrives a little early is throttled again and goes to the back of the
schedule, leaving capacity unused; 1.5 keeps the limiter fed. Slots are spread at most
``max_spread`` seconds ahead; past that, intents are parked at the limit, which bounds both
the churn of a huge backlog and the wait after the backlog clears.

:class:`LocalPacer` keeps the slot clock in this process; :class:`RedisPacer` keeps it in
Redis (one key per provider, hash-tagged), so R routers share one schedule and a backlog is
re-leased at the provider's rate, not R times that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

__all__ = ["LocalPacer", "Pacer", "RedisPacer", "pace_key"]

log = logging.getLogger("sluice.router.pacing")

DEFAULT_HEADROOM = 1.5
# A round never waits longer than this for Redis: pacing locally is better than stalling.
REDIS_TIMEOUT_SECONDS = 0.25
_MICROS = 1_000_000


class Pacer(Protocol):
    """Reserves due times for throttled intents."""

    async def reserve(self, provider: str, earliest: datetime, n: int) -> list[datetime]:
        """``n`` due times for ``provider``, none before ``earliest``, one slot apart."""
        ...


def _intervals(rates: Mapping[str, float], headroom: float) -> dict[str, float]:
    return {name: 1.0 / (rate * headroom) for name, rate in rates.items() if rate > 0}


def _slots(start: datetime, n: int, room: int, interval: float, limit: datetime) -> list[datetime]:
    step = timedelta(seconds=interval)
    return [start + step * i for i in range(room)] + [limit] * (n - room)


def _room(start: datetime, n: int, interval: float, limit: datetime) -> int:
    """How many of ``n`` slots from ``start`` fit before ``limit``."""
    if start > limit:
        return 0
    return min(n, int((limit - start).total_seconds() / interval) + 1)


class LocalPacer:
    """The slot clock of one router process."""

    def __init__(
        self, rates: Mapping[str, float], max_spread: float, headroom: float = DEFAULT_HEADROOM
    ) -> None:
        self._interval = _intervals(rates, headroom)
        self._max_spread = max_spread
        self._next: dict[str, datetime] = {}

    def due_at(self, provider: str, earliest: datetime) -> datetime:
        """One slot (the synchronous form of :meth:`reserve` with ``n=1``)."""
        return self._take(provider, earliest, 1)[0]

    async def reserve(self, provider: str, earliest: datetime, n: int) -> list[datetime]:
        """See :class:`Pacer`."""
        return self._take(provider, earliest, n)

    def _take(self, provider: str, earliest: datetime, n: int) -> list[datetime]:
        interval = self._interval.get(provider)
        if interval is None:
            return [earliest] * n
        start = max(earliest, self._next.get(provider, earliest))
        limit = earliest + timedelta(seconds=self._max_spread)
        room = _room(start, n, interval, limit)
        if room:
            self._next[provider] = start + timedelta(seconds=interval * room)
        return _slots(start, n, room, interval, limit)


# KEYS[1] the provider's next free slot (µs since the epoch). ARGV: earliest, interval,
# max_spread (all µs), n. Returns {start, room}: room slots from start fit before the limit.
_RESERVE = """
local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
local earliest = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local spread = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local start = math.max(earliest, nxt)
local limit = earliest + spread
if start > limit then return {string.format('%d', start), 0} end
local room = math.min(n, math.floor((limit - start) / interval) + 1)
-- %d, not tostring: Lua prints numbers this large as 1.79e+15, which loses microseconds
redis.call('SET', KEYS[1], string.format('%d', start + room * interval), 'PX',
           math.floor(spread / 1000) + 60000)
return {string.format('%d', start), room}
"""


def pace_key(prefix: str, provider: str) -> str:
    """The Redis key of a provider's slot clock (hash-tagged by provider, like the sender's
    rate-limit keys, so a cluster keeps each provider's keys in one slot)."""
    return f"{prefix}:pace:{{{provider}}}"


class RedisPacer:
    """The slot clock shared by every router through Redis. When Redis cannot be reached
    it falls back to this process's own clock: pacing is an optimisation, not a promise."""

    def __init__(
        self,
        redis: Any,
        prefix: str,
        rates: Mapping[str, float],
        max_spread: float,
        headroom: float = DEFAULT_HEADROOM,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._interval = _intervals(rates, headroom)
        self._max_spread = max_spread
        self._script = redis.register_script(_RESERVE)
        self._local = LocalPacer(rates, max_spread, headroom)

    async def reserve(self, provider: str, earliest: datetime, n: int) -> list[datetime]:
        """See :class:`Pacer`."""
        interval = self._interval.get(provider)
        if interval is None:
            return [earliest] * n
        earliest_us = int(earliest.timestamp() * _MICROS)
        try:
            start_raw, room = await asyncio.wait_for(
                self._script(
                    keys=[pace_key(self._prefix, provider)],
                    args=[earliest_us, int(interval * _MICROS), int(self._max_spread * _MICROS), n],
                ),
                REDIS_TIMEOUT_SECONDS,
            )
            start = datetime.fromtimestamp(int(start_raw) / _MICROS, UTC)
        except Exception:  # any Redis failure or odd reply: pace locally instead
            log.warning("pacing %s locally: Redis did not answer", provider, exc_info=True)
            return await self._local.reserve(provider, earliest, n)
        limit = earliest + timedelta(seconds=self._max_spread)
        return _slots(max(start, earliest), n, int(room), interval, limit)
