"""Admission control: past its capacity, ingest says no at once instead of queueing.

A call is admitted only while fewer than ``max_calls`` calls and ``max_items`` intents are
being worked on in this process; otherwise it gets RESOURCE_EXHAUSTED (reason
``OVERLOADED``) with a RetryInfo hint, before any validation or database work. There is no
wait queue: queued work is what made the seed's latency grow without bound under overload
(p50 0.8 s at 2,000 requests/s), and a client that is told to come back in 100 ms can
spread its retries, while one that waits in a queue only times out. The bounds also bound
memory: at most ``max_items`` decoded submissions are held at once (a 10,000-item batch
weighs 10,000).

Counting calls is not enough, because calls also wait where no counter of started calls
sees them: in gRPC core, which holds arriving calls until the process takes them up, one
at a time, on its event loop. When calls come faster than the loop takes them up, that
backlog grows, and every call in it waits its turn (latency first, then gRPC's own
refusals, CANCELLED, past its bound). So a monitor task reads, every ``interval``:

- how many calls wait in gRPC core (``waiting``, from the listener's channelz counters):
  while more than ``max_waiting`` do, every new call is refused. Refusing is quick, so the
  loop takes the backlog up fast and it drains; what is admitted waited at most about
  ``max_waiting`` calls' worth of taking up;
- how late a short sleep wakes up (lag, smoothed): above ``max_lag`` seconds, every new
  call is refused too (the loop is starved, e.g. of CPU).

Single-threaded asyncio, so plain counters are safe; the ``with`` block releases on every
exit, cancellation included.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterator

from sluice.common.errors import ResourceExhausted

OVERLOADED = "OVERLOADED"
_SMOOTHING = 0.3  # weight of the newest lag sample (about five samples remembered)


class Admission:
    """Counts calls and intents in flight and refuses what exceeds the bounds."""

    def __init__(
        self,
        *,
        max_calls: int,
        max_items: int,
        retry_after: float,
        max_lag: float = 0.0,
        max_waiting: int = 0,
        waiting: Callable[[], int | None] | None = None,
    ) -> None:
        self.max_calls = max_calls
        self.max_items = max_items
        self.retry_after = retry_after
        self.max_lag = max_lag
        self.max_waiting = max_waiting
        self._read_waiting = waiting
        self.calls = 0
        self.items = 0
        self.shed = 0
        self.lag = 0.0
        #: Calls waiting in gRPC core at the last reading (0 when not measurable).
        self.waiting = 0
        self._rng = random.Random()

    async def watch(self, interval: float = 0.05) -> None:
        """Runs until cancelled, keeping ``lag`` and ``waiting`` current."""
        while True:
            started = time.monotonic()
            await asyncio.sleep(interval)
            late = max(0.0, time.monotonic() - started - interval)
            self.lag += (late - self.lag) * _SMOOTHING
            if self._read_waiting is not None:
                self.waiting = self._read_waiting() or 0

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
        if self.max_waiting and self.waiting > self.max_waiting:
            raise self._refuse(f"{self.waiting} calls waiting to be taken up")
        if self.max_lag and self.lag > self.max_lag:
            raise self._refuse(f"event loop {self.lag * 1000:.0f} ms behind")
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
