"""Circuit breakers per provider and per (provider, intent kind).

A circuit is CLOSED while the rolling success rate of its recent attempts stays at or above
``threshold`` (98 % by default) and their mean call latency under ``max_latency``. Once it
has ``min_samples`` samples and breaks either bound it OPENs: routing moves its traffic to
the next candidate. After ``cooldown`` seconds it is HALF_OPEN: one batch per
``probe_every`` seconds is let through (a trickle); ``close_after`` good probe batches in a
row close it, one bad probe batch opens it again for another cool-down.

A sample is a message that may have reached the provider: accepted (good) or failed
transiently or unknown (bad). Throttling and permanent failures say nothing about the
provider, and an unreachable provider is handled by the outage clock (held intents, probes),
so none of those are samples.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CircuitBreakers", "CircuitState"]


class CircuitState(enum.Enum):
    """Where a circuit stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class CircuitConfig:
    """The breakers' bounds (see the module docstring)."""

    threshold: float = 0.98
    max_latency: float = 5.0
    min_samples: int = 50
    window: int = 200
    max_age: float = 60.0
    cooldown: float = 30.0
    probe_every: float = 1.0
    close_after: int = 3


class _Circuit:
    __slots__ = ("good", "latency", "opened_at", "probe_at", "probes_ok", "samples", "state")

    def __init__(self, window: int) -> None:
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=window)
        self.good = 0
        self.latency: deque[tuple[float, float]] = deque(maxlen=window)
        self.state = CircuitState.CLOSED
        self.opened_at = 0.0
        self.probe_at = 0.0
        self.probes_ok = 0


class CircuitBreakers:
    """Every circuit of one router. One event loop, no locks."""

    def __init__(
        self, config: CircuitConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config if config is not None else CircuitConfig()
        self._clock = clock
        self._circuits: dict[tuple[str, str], _Circuit] = {}

    def _get(self, provider: str, kind: str) -> _Circuit:
        circuit = self._circuits.get((provider, kind))
        if circuit is None:
            circuit = self._circuits[(provider, kind)] = _Circuit(self.config.window)
        return circuit

    def record(self, provider: str, kind: str, *, ok: int, failed: int, seconds: float) -> None:
        """One batch's samples, for the provider's circuit and for its (provider, kind)."""
        if ok <= 0 and failed <= 0:
            return
        for key in {"", kind}:
            self._record(self._get(provider, key), ok, failed, seconds)

    def _advance(self, c: _Circuit, now: float) -> CircuitState:
        if c.state is CircuitState.OPEN and now - c.opened_at >= self.config.cooldown:
            c.state = CircuitState.HALF_OPEN
            c.probe_at = 0.0
        return c.state

    def _record(self, c: _Circuit, ok: int, failed: int, seconds: float) -> None:
        now = self._clock()
        cfg = self.config
        self._advance(c, now)
        if c.state is CircuitState.HALF_OPEN:
            good = failed == 0 and seconds <= cfg.max_latency
            c.probes_ok = c.probes_ok + 1 if good else 0
            if not good:
                self._open(c, now)
            elif c.probes_ok >= cfg.close_after:
                c.state = CircuitState.CLOSED
                c.samples.clear()
                c.latency.clear()
                c.good = 0
            return
        if c.state is CircuitState.OPEN:
            return  # late results of batches sent before it opened
        if len(c.samples) == c.samples.maxlen:
            c.good -= c.samples[0][1]
        c.samples.append((now, ok, ok + failed))
        c.good += ok
        c.latency.append((now, seconds))
        self._prune(c, now)
        total = sum(n for _, _, n in c.samples)
        if total < cfg.min_samples:
            return
        mean_latency = sum(s for _, s in c.latency) / len(c.latency)
        if c.good / total < cfg.threshold or mean_latency > cfg.max_latency:
            self._open(c, now)

    def _prune(self, c: _Circuit, now: float) -> None:
        cutoff = now - self.config.max_age
        while c.samples and c.samples[0][0] < cutoff:
            c.good -= c.samples.popleft()[1]
        while c.latency and c.latency[0][0] < cutoff:
            c.latency.popleft()

    def _open(self, c: _Circuit, now: float) -> None:
        c.state = CircuitState.OPEN
        c.opened_at = now
        c.probes_ok = 0
        c.samples.clear()
        c.latency.clear()
        c.good = 0

    def state(self, provider: str, kind: str = "") -> CircuitState:
        """The circuit's state now (an OPEN circuit past its cool-down reads HALF_OPEN)."""
        c = self._circuits.get((provider, kind))
        if c is None:
            return CircuitState.CLOSED
        return self._advance(c, self._clock())

    def success_rate(self, provider: str, kind: str = "") -> float:
        """Share of the circuit's recent samples that were good; 1.0 with none."""
        c = self._circuits.get((provider, kind))
        if c is None:
            return 1.0
        self._prune(c, self._clock())
        total = sum(n for _, _, n in c.samples)
        return c.good / total if total else 1.0

    def open_providers(self, kind: str | None = None) -> set[str]:
        """Providers to route around now, for ``kind`` (None: the provider-wide circuits).

        A HALF_OPEN circuit is left out of this set once per ``probe_every`` seconds: that
        round's batch to it is the trickle of probes.
        """
        now = self._clock()
        out: set[str] = set()
        for (provider, key), c in self._circuits.items():
            if key not in ("", kind or ""):
                continue
            state = self.state(provider, key)
            if state is CircuitState.OPEN:
                out.add(provider)
            elif state is CircuitState.HALF_OPEN:
                if now >= c.probe_at:
                    c.probe_at = now + self.config.probe_every
                else:
                    out.add(provider)
        return out
