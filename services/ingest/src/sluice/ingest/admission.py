"""Admission control: past its capacity, ingest says no at once instead of queueing.

A call is admitted only while fewer than ``max_calls`` calls and ``max_items`` intents are
being worked on in this process; otherwise it gets RESOURCE_EXHAUSTED (reason
``OVERLOADED``) with a RetryInfo hint, before any validation or database work. There is no
wait queue: queued work is what made the seed's latency grow without bound under overload
(p50 0.8 s at 2,000 requests/s), and a client that is told to come back in 100 ms can
spread its retries, while one that waits in a queue only times out. The bounds also bound
memory: at most ``max_items`` decoded submissions are held at once (a 10,000-item batch
weighs 10,000).

Counting calls is not enough, because calls also wait where no counter sees them: in gRPC
core, which holds arriving calls until the process takes them up, one at a time, on its
event loop. A loop that never idles takes them up slower than they come, the backlog there
grows (latency first, then gRPC's own refusals: CANCELLED), and no count of started calls
notices. So a monitor task measures two things every ``interval``:

- how busy the loop is: the share of wall time it did not spend waiting for I/O with
  nothing to run (:class:`IdleMeter`). While that stays above ``max_busy``, only a share of
  new calls is admitted, cut by a fifth each interval and grown back by a twentieth once
  the loop has room again; the refused ones cost little, and the loop keeps the headroom
  that takes up every arriving call at once;
- how late a short sleep wakes up (lag, smoothed): above ``max_lag`` seconds, every new
  call is refused (the loop is starved, e.g. of CPU).

Single-threaded asyncio, so plain counters are safe; the ``with`` block releases on every
exit, cancellation included.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from sluice.common.errors import ResourceExhausted

OVERLOADED = "OVERLOADED"
_SMOOTHING = 0.3  # weight of the newest sample (about five samples remembered)
_CUT, _REGROW, _LEAST = 0.8, 0.05, 0.02  # the admitted share: x0.8 busy, +0.05 not, >= 2%


class IdleMeter:
    """Seconds an event loop has spent waiting in its selector, summed.

    Installed once per loop by wrapping the selector's ``select``; asyncio offers no
    public hook, so a loop without a selector (not a SelectorEventLoop) reports None and
    only the lag rule applies.
    """

    _meters: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, IdleMeter]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, select: Callable[..., Any]) -> None:
        self.idle = 0.0
        self._select = select

    def select(self, timeout: float | None = None) -> Any:
        """The selector's select, timed."""
        started = time.perf_counter()
        try:
            return self._select(timeout)
        finally:
            self.idle += time.perf_counter() - started

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> IdleMeter | None:
        """The loop's meter, installed on first use."""
        meter = cls._meters.get(loop)
        if meter is None:
            selector = getattr(loop, "_selector", None)
            select = getattr(selector, "select", None)
            if select is None:
                return None
            meter = cls._meters[loop] = cls(select)
            selector.select = meter.select  # type: ignore[union-attr]
        return meter


class Admission:
    """Counts calls and intents in flight and refuses what exceeds the bounds."""

    def __init__(
        self,
        *,
        max_calls: int,
        max_items: int,
        retry_after: float,
        max_lag: float = 0.0,
        max_busy: float = 1.0,
    ) -> None:
        self.max_calls = max_calls
        self.max_items = max_items
        self.retry_after = retry_after
        self.max_lag = max_lag
        self.max_busy = max_busy
        self.calls = 0
        self.items = 0
        self.shed = 0
        self.lag = 0.0
        #: Smoothed share of time the loop had work to run (None: not measurable here).
        self.busy: float | None = None
        #: Share of new calls admitted while the loop is busier than ``max_busy``.
        self.admitting = 1.0
        self._rng = random.Random()

    async def watch(self, interval: float = 0.02) -> None:
        """Runs until cancelled, keeping ``lag``, ``busy`` and ``admitting`` current."""
        meter = IdleMeter.of(asyncio.get_running_loop()) if self.max_busy < 1 else None
        idle = meter.idle if meter else 0.0
        while True:
            started = time.perf_counter()
            await asyncio.sleep(interval)
            now = time.perf_counter()
            late = max(0.0, now - started - interval)
            self.lag += (late - self.lag) * _SMOOTHING
            if meter is not None:
                busy = max(0.0, 1.0 - (meter.idle - idle) / (now - started))
                idle = meter.idle
                self.busy = busy if self.busy is None else self.busy + (busy - self.busy) * 0.3
                if self.busy > self.max_busy:
                    self.admitting = max(_LEAST, self.admitting * _CUT)
                else:
                    self.admitting = min(1.0, self.admitting + _REGROW)

    def _refuse(self, what: str) -> ResourceExhausted:
        self.shed += 1
        # Up to 50% jitter, so clients shed together do not all return together.
        delay = self.retry_after * (1 + self._rng.random() / 2)
        exc = ResourceExhausted(
            f"ingest is at capacity ({what}); retry after {delay:.2f} s",
            retry_after=delay,
            metadata={"limit": what},
        )
        exc.reason = OVERLOADED
        return exc

    @contextlib.contextmanager
    def admit(self, items: int = 1) -> Iterator[None]:
        """Holds one call and ``items`` intents for the block, or raises ResourceExhausted."""
        if self.calls >= self.max_calls:
            raise self._refuse(f"{self.max_calls} calls in flight")
        if self.max_lag and self.lag > self.max_lag:
            raise self._refuse(f"event loop {self.lag * 1000:.0f} ms behind")
        if self.admitting < 1.0 and self._rng.random() >= self.admitting:
            raise self._refuse(f"event loop busy {self.busy or 0:.0%} of the time")
        # A request bigger than the item bound alone is let in when nothing else is held,
        # so a legal request is never refused forever.
        if self.items and self.items + items > self.max_items:
            raise self._refuse(f"{self.max_items} intents in flight")
        self.calls += 1
        self.items += items
        try:
            yield
        finally:
            self.calls -= 1
            self.items -= items
