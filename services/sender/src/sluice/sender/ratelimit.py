"""Cluster-wide rate limiting of provider sends, shared through Redis by every sender.

What is limited, per provider (``ProviderConfig``; 0 turns a limit off):

- messages: ``sustained_rate`` per second over time (a token bucket holding at most
  ``burst``) and at most ``burst`` in any one second (an exact sliding window of grants);
- API requests: ``requests_per_second`` and ``request_burst``, the same two shapes. The
  caller passes the request shape itself (``acquire(provider, requests)``: how many
  messages each planned provider call carries, as the adapter would split them), so a
  reservation counts exactly the calls that will be made;
- ``daily_quota`` messages in any rolling 24 hours (hour buckets, so counts leave up to an
  hour late: never over, sometimes a little under).

One Lua script (``ratelimit.lua``) checks and reserves all of them atomically using Redis
``TIME``, so senders on different machines share one clock and can never jointly
over-reserve; it grants only what every limit allows. The window is ``1 s +
window_guard`` long: a message reserved at Redis time *t* reaches the provider a little
later (rendering, the adapter), and the guard absorbs that jitter so the provider's own
one-second view never sees more than ``burst``.

Adaptive: when a provider throttles anyway (its limit is lower than configured, or shared
with someone else), the servicer calls ``report_throttled``. The provider's effective rates
and bursts are scaled by a factor kept in Redis, so every replica slows down together: it
halves at most once per ``cut_cooldown`` and recovers linearly by ``recovery_per_second``
(AIMD), so the cluster settles just below the real limit without a configuration change.
The provider's retry-after pauses every replica until then. What a provider announces in
its headers, accepted answers included, is reported with ``throttled=False``: a request
rate caps the configured request rate (and its whole requests per second the request
burst) for an hour, and a window with nothing left pauses every replica until it resets;
neither touches the factor, and neither does a used-up quota, which only pauses.

Redis unreachable: ``acquire`` raises ``Unavailable`` and nothing is sent (fail closed);
redis-py reconnects on the next call, so sending resumes by itself when Redis is back.

Keys (all with the ``{provider}`` hash tag, so one script touches one Redis Cluster slot)::

    {prefix}:rl:{<provider>}:sustained  :burst  :burst_sum     messages
    {prefix}:rl:{<provider>}:req        :req_window  :req_sum  requests
    {prefix}:rl:{<provider>}:adapt                             factor, pause, published rate
    {prefix}:rl:{<provider>}:quota                             messages per hour, 24 hours
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sluice.common.errors import Unavailable
from sluice.common.providers import ProviderConfig

_SCRIPT = resources.files("sluice.sender").joinpath("ratelimit.lua").read_text(encoding="utf-8")
_MICROS = 1_000_000
# What a caller is told to wait while Redis is unreachable: short, since redis-py reconnects
# on the next call and sending should resume within seconds of Redis coming back.
REDIS_DOWN_RETRY_SECONDS = 1.0
# A process re-writes a published rate it already wrote (unchanged) at most this often, so
# announcing headers on every answer costs no Redis call per batch; the rate lasts an hour.
PUBLISHED_REFRESH_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Limits:
    """A provider's limits as the limiter applies them (0 = off)."""

    rate: float
    burst: int
    requests_per_second: float = 0.0
    request_burst: int = 0
    daily_quota: int = 0

    @classmethod
    def of(cls, config: ProviderConfig) -> Limits:
        """The limits configured for a provider."""
        return cls(
            rate=float(config.sustained_rate),
            burst=config.burst,
            requests_per_second=config.requests_per_second,
            request_burst=config.request_burst,
            daily_quota=config.daily_quota,
        )

    @property
    def unlimited(self) -> bool:
        """True when no limit applies at all."""
        return not (
            self.rate > 0
            or self.burst > 0
            or self.requests_per_second > 0
            or self.request_burst > 0
            or self.daily_quota > 0
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """The outcome of one reservation.

    ``granted`` messages may be sent now (0..n): the first ``requests`` of the planned
    requests, whole except that the last may be cut to its first messages (``granted_of``
    picks them). When fewer than asked were granted, ``retry_after`` is the
    number of seconds until every limit allows at least one more (exact: add ``jittered``
    when telling a client); otherwise it is 0. ``at_us`` is the Redis time (µs since the
    epoch) of the reservation, 0 for unlimited providers, which never touch Redis.
    """

    granted: int
    retry_after: float
    at_us: int = 0
    requests: int = 0
    #: Messages the sustained bucket still allows after this grant (None: unlimited).
    tokens_left: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Capacity:
    """What a provider's limits allow right now, read without reserving anything.

    A limit that is off reads as 0 in both its limit and its availability field, as in
    ``ProviderConfig``; ``unlimited`` says every limit is off. Rates and bursts are the
    configured ones; ``factor`` (0..1] is the adaptive scale applied to them now,
    ``paused_for`` the seconds left of a provider-requested pause, ``published_rps`` a
    request rate the provider announced (0 = none).
    """

    sustained_tokens: float
    sustained_rate: float
    burst_available: int
    burst: int
    unlimited: bool
    request_tokens: float = 0.0
    requests_per_second: float = 0.0
    request_burst_available: int = 0
    request_burst: int = 0
    daily_quota: int = 0
    daily_used: int = 0
    factor: float = 1.0
    paused_for: float = 0.0
    published_rps: float = 0.0

    @property
    def available(self) -> int | None:
        """Messages a reservation could get now, or None when nothing limits it."""
        if self.unlimited:
            return None
        if self.paused_for > 0:
            return 0
        limits: list[int] = []
        if self.sustained_rate > 0:
            limits.append(int(self.sustained_tokens))
        if self.burst > 0:
            limits.append(self.burst_available)
        if self.daily_quota > 0:
            limits.append(max(0, self.daily_quota - self.daily_used))
        return min(limits) if limits else None


def rate_limit_keys(prefix: str, provider: str) -> list[str]:
    """The Redis keys of a provider's limiter, in the order the script takes them."""
    base = f"{prefix}:rl:{{{provider}}}"
    return [
        f"{base}:sustained",
        f"{base}:burst",
        f"{base}:burst_sum",
        f"{base}:req",
        f"{base}:req_window",
        f"{base}:req_sum",
        f"{base}:adapt",
        f"{base}:quota",
    ]


def jittered(seconds: float, rng: random.Random | None = None) -> float:
    """``seconds`` plus up to 10 % (at least up to 5 ms), so throttled clients of every
    replica do not come back in the same instant."""
    if seconds <= 0:
        return seconds
    draw = (rng or random).random()
    return seconds + draw * max(0.005, seconds * 0.1)


class RateLimiter:
    """Reserves provider sends against limits shared by every sender process.

    ``prefix`` starts every key (tests use a unique one). ``window_guard`` (seconds) is added
    to the one-second burst window; see the module docstring for the adaptive knobs.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        window_guard: float = 0.05,
        *,
        recovery_per_second: float = 0.05,
        floor_factor: float = 0.05,
        cut_cooldown: float = 1.0,
    ) -> None:
        if window_guard < 0:
            raise ValueError("window_guard must not be negative")
        if recovery_per_second <= 0 or not 0 < floor_factor <= 1 or cut_cooldown < 0:
            raise ValueError("recovery must be positive, floor in (0, 1], cooldown >= 0")
        self._prefix = prefix
        self._window_us = round((1.0 + window_guard) * _MICROS)
        self._recovery = recovery_per_second
        self._floor = floor_factor
        self._cooldown_us = round(cut_cooldown * _MICROS)
        # Unlimited providers skip Redis until one reports a throttle: from then on this
        # process honours the shared pause and published rate for it too.
        self._adaptive: set[str] = set()
        # Provider -> (published rate, monotonic time) this process last wrote.
        self._published: dict[str, tuple[float, float]] = {}
        # redis-py keeps the SHA and reloads the script on NOSCRIPT (e.g. after a restart).
        self._script = redis.register_script(_SCRIPT)

    @property
    def window_seconds(self) -> float:
        """Length of the burst window, including the guard."""
        return self._window_us / _MICROS

    def _skips(self, provider: ProviderConfig, limits: Limits) -> bool:
        return limits.unlimited and provider.name not in self._adaptive

    async def acquire(
        self, provider: ProviderConfig, requests: Sequence[int], *, now_us: int | None = None
    ) -> Grant:
        """Reserves up to ``sum(requests)`` sends now; grants may be partial.

        ``requests`` is the request shape: the number of messages each provider call will
        carry, in the order they will be made (the adapter's ``plan``). What is granted is
        a prefix of it (see ``Grant``), so the request limits count exactly the calls made.
        ``now_us`` replaces Redis ``TIME``; only tests with a simulated clock pass it.
        Raises ``Unavailable`` when Redis cannot be reached: nothing may be sent then.
        """
        return await self._reserve(provider, "acquire", requests, now_us)

    async def preview(
        self, provider: ProviderConfig, requests: Sequence[int], *, now_us: int | None = None
    ) -> Grant:
        """What ``acquire(provider, requests)`` would grant now, reserving nothing.

        The servicer renders only what a preview allows and reserves afterwards, so the time
        between a reservation and the provider seeing the request stays short (rendering
        runs in another process and can be delayed on a busy machine); see ``window_guard``.
        """
        return await self._reserve(provider, "peek", requests, now_us)

    async def _reserve(
        self, provider: ProviderConfig, mode: str, requests: Sequence[int], now_us: int | None
    ) -> Grant:
        if any(size < 1 for size in requests):
            raise ValueError("every request carries at least one message")
        n = sum(requests)
        limits = Limits.of(provider)
        if n == 0 or self._skips(provider, limits):
            return Grant(granted=n, retry_after=0.0, requests=len(requests))
        return _grant(await self._run(provider, limits, mode, now_us, shape=requests))

    async def capacity(self, provider: ProviderConfig, *, now_us: int | None = None) -> Capacity:
        """Reads what the limits allow now without reserving (the script writes nothing)."""
        limits = Limits.of(provider)
        if self._skips(provider, limits):
            return Capacity(0.0, 0.0, 0, 0, unlimited=True)
        r = await self._run(provider, limits, "peek", now_us)
        return Capacity(
            sustained_tokens=max(r[3], 0) / _MICROS,
            sustained_rate=limits.rate,
            burst_available=max(r[4], 0),
            burst=limits.burst,
            unlimited=limits.unlimited,
            request_tokens=max(r[5], 0) / _MICROS,
            requests_per_second=limits.requests_per_second,
            request_burst_available=max(r[6], 0),
            request_burst=limits.request_burst,
            daily_quota=limits.daily_quota,
            daily_used=max(r[7], 0),
            factor=r[8] / _MICROS,
            paused_for=r[9] / _MICROS,
            published_rps=r[10] / _MICROS,
        )

    async def report_throttled(
        self,
        provider: ProviderConfig,
        *,
        retry_after: float = 0.0,
        published_rps: float = 0.0,
        throttled: bool = True,
        now_us: int | None = None,
    ) -> float | None:
        """Tells every replica the provider throttled a send the limiter had granted.

        The shared factor halves (once per cooldown, never below the floor) and recovers
        gradually; ``retry_after`` (seconds, from the provider's answer) pauses all sends to
        it until then; ``published_rps`` is a request rate the provider announced in its
        headers (e.g. ``ratelimit-limit`` over its window). With ``throttled=False`` only
        the published rate and pause are taken (headers of an accepted answer, a used-up
        quota). Returns the factor now in force, or None when nothing was new to tell: no
        throttle, no pause, and the rate this process wrote within the refresh interval.
        Raises ``Unavailable`` when Redis cannot be reached.
        """
        name = provider.name
        if not throttled and retry_after <= 0 and not self._is_news(name, published_rps):
            return None
        self._adaptive.add(name)
        reply = await self._run(
            provider,
            Limits.of(provider),
            "report",
            now_us,
            extra=[
                max(0, round(retry_after * _MICROS)),
                max(0, round(published_rps * _MICROS)),
                self._cooldown_us,
                1 if throttled else 0,
            ],
        )
        if published_rps > 0:
            self._published[name] = (published_rps, time.monotonic())
        return reply[0] / _MICROS

    def _is_news(self, name: str, published_rps: float) -> bool:
        """True for a published rate this process has not written within the refresh."""
        if published_rps <= 0:
            return False
        last = self._published.get(name)
        return (
            last is None
            or last[0] != published_rps
            or time.monotonic() - last[1] >= PUBLISHED_REFRESH_SECONDS
        )

    async def _run(
        self,
        provider: ProviderConfig,
        limits: Limits,
        mode: str,
        now_us: int | None,
        *,
        shape: Sequence[int] = (),
        extra: Sequence[int] = (),
    ) -> list[int]:
        """Runs the script: ``shape`` is the request shape (acquire, peek), ``extra`` the
        report's arguments."""
        shape_runs = runs(shape)
        args: list[str | int] = [
            mode,
            "" if now_us is None else now_us,
            sum(shape),
            len(shape_runs) // 2,
            repr(limits.rate),
            limits.burst,
            repr(limits.requests_per_second),
            limits.request_burst,
            limits.daily_quota,
            self._window_us,
            repr(self._recovery),
            repr(self._floor),
            *extra,
            *shape_runs,
        ]
        try:
            reply = await self._script(keys=rate_limit_keys(self._prefix, provider.name), args=args)
        except (RedisError, OSError) as exc:
            raise Unavailable(
                f"rate limiter for provider {provider.name!r}: {exc}",
                retry_after=jittered(REDIS_DOWN_RETRY_SECONDS),
            ) from exc
        return [int(v) for v in reply]


def runs(requests: Sequence[int]) -> list[int]:
    """The request shape run-length encoded (size, count, size, count...): the usual shapes
    (100, 100, 100, 20; one message per call) take a few script arguments, not thousands."""
    out: list[int] = []
    for size in requests:
        if out and out[-2] == size:
            out[-1] += 1
        else:
            out += [size, 1]
    return out


def even_requests(n: int, largest: int | None) -> list[int]:
    """``n`` messages in requests of ``largest`` each (the last one shorter), or all in one
    when ``largest`` is None."""
    size = n if largest is None else max(1, largest)
    return [min(size, n - start) for start in range(0, n, size)] if n else []


def granted_of(plan: Sequence[Sequence[int]], grant: Grant) -> list[int]:
    """The message indices a grant covers, in ascending order: the plan's first
    ``grant.requests`` requests, the last one cut so that ``grant.granted`` are taken."""
    left = grant.granted
    chosen: list[int] = []
    for request in plan[: grant.requests]:
        chosen.extend(request[:left])
        left -= min(left, len(request))
    return sorted(chosen)


def _grant(reply: list[int]) -> Grant:
    return Grant(
        granted=reply[0],
        retry_after=reply[2] / _MICROS,
        at_us=reply[11],
        requests=reply[1],
        tokens_left=None if reply[3] < 0 else reply[3] / _MICROS,
    )
