"""Cluster-wide rate limiting of provider sends, shared through Redis by every sender.

Each provider has two limits (``ProviderConfig``): ``burst``, the most messages in any one
second, kept as an exact sliding window of grants; and ``sustained_rate``, a token bucket
refilling at that rate and holding at most ``burst`` tokens. One Lua script
(``ratelimit.lua``) checks and reserves both atomically using Redis ``TIME``, so senders on
different machines share one clock and can never jointly over-reserve.

The window is ``1 s + window_guard`` long: a message reserved at Redis time *t* reaches the
provider a little later, and the guard absorbs that jitter so the provider's own one-second
view never sees more than ``burst``. Keys (all with the ``{provider}`` hash tag, so one
script touches one Redis Cluster slot)::

    {prefix}:rl:{<provider>}:sustained    HASH  bucket tokens and last refill time
    {prefix}:rl:{<provider>}:burst        ZSET  grants in the window, scored by time (µs)
    {prefix}:rl:{<provider>}:burst_sum    HASH  running sum of those grants and a sequence
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sluice.common.errors import Unavailable
from sluice.common.providers import ProviderConfig

_SCRIPT = resources.files("sluice.sender").joinpath("ratelimit.lua").read_text(encoding="utf-8")
_MICROS = 1_000_000


@dataclass(frozen=True, slots=True)
class Grant:
    """The outcome of one reservation.

    ``granted`` messages may be sent now (0..n). When fewer than asked were granted,
    ``retry_after`` is the number of seconds until both limits allow at least one more;
    otherwise it is 0. ``at_us`` is the Redis time (µs since the epoch) of the reservation,
    0 for unlimited providers, which never touch Redis.
    """

    granted: int
    retry_after: float
    at_us: int = 0
    #: Messages the sustained bucket still allows after this grant (None: unlimited).
    tokens_left: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Capacity:
    """What a provider's limits allow right now, read without reserving anything.

    A limit that is off reads as 0 in both its limit and its availability field
    (``sustained_rate == 0`` → ``sustained_tokens == 0``; ``burst == 0`` →
    ``burst_available == 0``), as in ``ProviderConfig``; ``unlimited`` says both are off.
    """

    sustained_tokens: float
    sustained_rate: float
    burst_available: int
    burst: int
    unlimited: bool

    @property
    def available(self) -> int | None:
        """Messages a reservation could get now, or None when nothing limits it."""
        limits: list[int] = []
        if self.sustained_rate > 0:
            limits.append(int(self.sustained_tokens))
        if self.burst > 0:
            limits.append(self.burst_available)
        return min(limits) if limits else None


def rate_limit_keys(prefix: str, provider: str) -> list[str]:
    """The Redis keys of a provider's limiter, in the order the script takes them."""
    base = f"{prefix}:rl:{{{provider}}}"
    return [f"{base}:sustained", f"{base}:burst", f"{base}:burst_sum"]


class RateLimiter:
    """Reserves provider sends against limits shared by every sender process.

    ``prefix`` starts every key (tests use a unique one). ``window_guard`` (seconds) is added
    to the one-second burst window; see the module docstring.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str, window_guard: float = 0.05) -> None:
        if window_guard < 0:
            raise ValueError("window_guard must not be negative")
        self._prefix = prefix
        self._window_us = round((1.0 + window_guard) * _MICROS)
        # redis-py keeps the SHA and reloads the script on NOSCRIPT (e.g. after a restart).
        self._script = redis.register_script(_SCRIPT)

    @property
    def window_seconds(self) -> float:
        """Length of the burst window, including the guard."""
        return self._window_us / _MICROS

    async def acquire(
        self, provider: ProviderConfig, n: int, *, now_us: int | None = None
    ) -> Grant:
        """Reserves up to ``n`` sends now; grants may be partial.

        ``now_us`` replaces Redis ``TIME``; only tests with a simulated clock pass it.
        Raises ``Unavailable`` when Redis cannot be reached.
        """
        if n < 0:
            raise ValueError("n must not be negative")
        if n == 0 or provider.unlimited:
            return Grant(granted=n, retry_after=0.0)
        granted, retry_us, tokens_u, _, at_us = await self._run(provider, n, "acquire", now_us)
        return Grant(
            granted=granted,
            retry_after=retry_us / _MICROS,
            at_us=at_us,
            tokens_left=None if tokens_u < 0 else tokens_u / _MICROS,
        )

    async def capacity(self, provider: ProviderConfig, *, now_us: int | None = None) -> Capacity:
        """Reads what the limits allow now without reserving (the script writes nothing)."""
        if provider.unlimited:
            return Capacity(0.0, 0.0, 0, 0, unlimited=True)
        _, _, tokens_u, available, _ = await self._run(provider, 0, "peek", now_us)
        return Capacity(
            sustained_tokens=max(tokens_u, 0) / _MICROS,
            sustained_rate=float(provider.sustained_rate),
            burst_available=max(available, 0),
            burst=provider.burst,
            unlimited=False,
        )

    async def _run(
        self, provider: ProviderConfig, n: int, mode: str, now_us: int | None
    ) -> tuple[int, int, int, int, int]:
        args: list[str | int] = [
            n,
            repr(float(provider.sustained_rate)),
            provider.burst,
            self._window_us,
            mode,
            "" if now_us is None else now_us,
        ]
        try:
            reply = await self._script(keys=rate_limit_keys(self._prefix, provider.name), args=args)
        except RedisError as exc:
            raise Unavailable(f"rate limiter for provider {provider.name!r}: {exc}") from exc
        granted, retry_us, tokens_u, available, at_us = (int(v) for v in reply)
        return granted, retry_us, tokens_u, available, at_us
