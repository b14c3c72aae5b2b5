"""Provider health as this router sees it: a rolling success rate per provider.

Every send attempt that reached a provider (accepted, or failed in a way that may pass) is a
sample; throttling is not a sample (it says the rate limit worked, not that the provider is
failing), and neither is a permanent failure (a bad address says nothing about the provider).
The rate over the last ``window`` samples decides the state:

* ``DISABLED`` - switched off in the configuration;
* ``DEGRADED`` - at least ``min_samples`` recent samples and a success rate below
  ``degraded_below`` (0.9);
* ``HEALTHY`` - otherwise.

Samples also age out after ``max_age`` seconds. Without that a provider marked DEGRADED would
get no more traffic while a healthy alternative exists, so it could never prove it recovered;
with it, a degraded provider is tried again once its bad samples are old.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sluice.common.providers import ProviderConfig
from sluice.v1 import router_pb2

DEFAULT_WINDOW = 200
DEFAULT_MIN_SAMPLES = 20
DEFAULT_DEGRADED_BELOW = 0.9
DEFAULT_MAX_AGE_SECONDS = 120.0


class HealthState(enum.Enum):
    """A provider's health, as reported by ListProviders and used by routing."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DISABLED = "disabled"

    def to_proto(self) -> router_pb2.ProviderHealth.ValueType:
        """The ``sluice.v1.ProviderHealth`` value for this state."""
        return _STATE_TO_PROTO[self]


_STATE_TO_PROTO: dict[HealthState, router_pb2.ProviderHealth.ValueType] = {
    HealthState.HEALTHY: router_pb2.PROVIDER_HEALTH_HEALTHY,
    HealthState.DEGRADED: router_pb2.PROVIDER_HEALTH_DEGRADED,
    HealthState.DISABLED: router_pb2.PROVIDER_HEALTH_DISABLED,
}


@dataclass(frozen=True)
class HealthReport:
    """One provider's state and the numbers behind it."""

    name: str
    state: HealthState
    success_rate: float
    samples: int


class _Window:
    """The last ``size`` samples of one provider as (monotonic time, ok) with a running count."""

    __slots__ = ("ok", "samples")

    def __init__(self, size: int) -> None:
        self.samples: deque[tuple[float, bool]] = deque(maxlen=size)
        self.ok = 0

    def add(self, at: float, ok: bool) -> None:
        if len(self.samples) == self.samples.maxlen and self.samples[0][1]:
            self.ok -= 1
        self.samples.append((at, ok))
        if ok:
            self.ok += 1

    def prune(self, older_than: float) -> None:
        while self.samples and self.samples[0][0] < older_than:
            _, ok = self.samples.popleft()
            if ok:
                self.ok -= 1


class ProviderHealthTracker:
    """Rolling success rates per provider; fed by the dispatcher, read by routing and
    ListProviders. Not thread-safe; used from one event loop."""

    def __init__(
        self,
        providers: Iterable[ProviderConfig],
        *,
        window: int = DEFAULT_WINDOW,
        min_samples: int = DEFAULT_MIN_SAMPLES,
        degraded_below: float = DEFAULT_DEGRADED_BELOW,
        max_age: float = DEFAULT_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._providers = {p.name: p for p in providers}
        self._window = window
        self._min_samples = min(min_samples, window)
        self._degraded_below = degraded_below
        self._max_age = max_age
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def record(self, provider: str, *, accepted: int = 0, failed: int = 0) -> None:
        """Adds ``accepted`` successful and ``failed`` transiently failed attempts."""
        if accepted <= 0 and failed <= 0:
            return
        window = self._windows.get(provider)
        if window is None:
            window = self._windows[provider] = _Window(self._window)
        now = self._clock()
        # Failures after successes: within one batch the order is unknown, and putting the
        # failures last makes a failing batch weigh in immediately.
        for _ in range(min(accepted, self._window)):
            window.add(now, True)
        for _ in range(min(failed, self._window)):
            window.add(now, False)

    def _current(self, provider: str) -> _Window | None:
        window = self._windows.get(provider)
        if window is not None:
            window.prune(self._clock() - self._max_age)
        return window

    def success_rate(self, provider: str) -> float:
        """Share of recent attempts that were accepted; 1.0 with no recent attempts."""
        window = self._current(provider)
        if window is None or not window.samples:
            return 1.0
        return window.ok / len(window.samples)

    def report(self, provider: str) -> HealthReport:
        """The state of one provider (unknown names are reported DISABLED)."""
        config = self._providers.get(provider)
        window = self._current(provider)
        samples = len(window.samples) if window is not None else 0
        rate = window.ok / samples if window is not None and samples else 1.0
        if config is None or not config.enabled:
            state = HealthState.DISABLED
        elif samples >= self._min_samples and rate < self._degraded_below:
            state = HealthState.DEGRADED
        else:
            state = HealthState.HEALTHY
        return HealthReport(name=provider, state=state, success_rate=rate, samples=samples)

    def state(self, provider: str) -> HealthState:
        """The state of one provider."""
        return self.report(provider).state

    def degraded(self) -> frozenset[str]:
        """Names of the enabled providers currently DEGRADED (what routing avoids)."""
        return frozenset(
            name for name in self._providers if self.state(name) is HealthState.DEGRADED
        )
