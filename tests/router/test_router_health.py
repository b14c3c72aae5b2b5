"""Provider health tracking without I/O."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.common.providers import ProviderConfig
from sluice.router.health import HealthState, ProviderHealthTracker
from sluice.v1 import router_pb2


def provider(name: str, *, enabled: bool = True) -> ProviderConfig:
    return ProviderConfig(
        name=name,
        kind="sandbox",
        cost_per_thousand=0.1,
        sustained_rate=0,
        burst=0,
        intents=frozenset({"marketing"}),
        enabled=enabled,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_no_attempts_means_healthy_with_rate_one_and_disabled_is_disabled() -> None:
    tracker = ProviderHealthTracker([provider("a"), provider("off", enabled=False)])
    assert tracker.success_rate("a") == 1.0
    assert tracker.state("a") is HealthState.HEALTHY
    assert tracker.state("off") is HealthState.DISABLED
    assert tracker.state("unknown") is HealthState.DISABLED
    assert HealthState.DISABLED.to_proto() == router_pb2.PROVIDER_HEALTH_DISABLED
    assert tracker.degraded() == frozenset()


def test_rate_below_threshold_degrades_only_after_enough_samples() -> None:
    tracker = ProviderHealthTracker([provider("a"), provider("b")], min_samples=10)
    tracker.record("a", accepted=2, failed=3)
    assert tracker.success_rate("a") == 0.4
    assert tracker.state("a") is HealthState.HEALTHY  # 5 samples are too few to judge
    tracker.record("a", accepted=2, failed=3)
    assert tracker.state("a") is HealthState.DEGRADED
    assert tracker.degraded() == frozenset({"a"})
    tracker.record("b", accepted=9, failed=1)
    assert tracker.success_rate("b") == 0.9
    assert tracker.state("b") is HealthState.HEALTHY  # 0.9 is not below 0.9


def test_the_window_rolls_so_a_provider_recovers() -> None:
    tracker = ProviderHealthTracker([provider("a")], window=20, min_samples=5)
    tracker.record("a", failed=20)
    assert tracker.state("a") is HealthState.DEGRADED
    tracker.record("a", accepted=19)
    assert tracker.success_rate("a") == 19 / 20
    assert tracker.state("a") is HealthState.HEALTHY


def test_old_samples_age_out() -> None:
    clock = Clock()
    tracker = ProviderHealthTracker([provider("a")], min_samples=5, max_age=60, clock=clock)
    tracker.record("a", failed=10)
    assert tracker.state("a") is HealthState.DEGRADED
    clock.now += 61
    assert tracker.success_rate("a") == 1.0
    assert tracker.state("a") is HealthState.HEALTHY


@settings(max_examples=100, deadline=None)
@given(
    batches=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), max_size=20),
    window=st.integers(1, 250),
)
def test_rate_matches_the_last_window_samples(batches: list[tuple[int, int]], window: int) -> None:
    tracker = ProviderHealthTracker([provider("a")], window=window)
    samples: list[bool] = []
    for accepted, failed in batches:
        tracker.record("a", accepted=accepted, failed=failed)
        samples += [True] * accepted + [False] * failed
    recent = samples[-window:]
    expected = sum(recent) / len(recent) if recent else 1.0
    assert abs(tracker.success_rate("a") - expected) < 1e-12
    report = tracker.report("a")
    assert report.samples == len(recent)
