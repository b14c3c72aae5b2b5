"""Pure tests of what each outcome does to its intent, the backoff, and the circuit breaker."""

from __future__ import annotations

import dataclasses
import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.router.circuit import CircuitBreakers, CircuitConfig, CircuitState
from sluice.router.outcomes import (
    RECONCILE,
    SENDER_TARGET,
    RetryPolicy,
    Timing,
    is_hard_bounce,
    resolve_batch,
    resolve_message,
)
from sluice.router.provider_state import OutageClock
from sluice.router.repository import Completion, LeasedIntent
from sluice.router.sender_client import BatchOutcome, MessageOutcome
from sluice.router.settings import RouterSettings
from sluice.v1 import sender_pb2

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=3, base_seconds=2.0, max_seconds=60.0)
TIMING = Timing(throttle_due=lambda provider, earliest: earliest, hold_seconds=lambda t: 1.5)


def intent(*, attempts: int = 0) -> LeasedIntent:
    return LeasedIntent(
        id=uuid.uuid4(),
        recipient="alice@example.com",
        kind="marketing",
        template_id="welcome",
        variables={},
        deadline=NOW + timedelta(hours=1),
        attempts=attempts,
        idempotency_key=uuid.uuid4().hex,
        traceparent=None,
        campaign_id="c",
    )


def resolve(
    i: LeasedIntent,
    outcome: sender_pb2.SendOutcome.ValueType,
    *,
    policy: RetryPolicy = POLICY,
    reached: bool = True,
    **fields: object,
) -> Completion:
    message = MessageOutcome(outcome, **fields)  # type: ignore[arg-type]
    return resolve_message(
        i,
        "ses",
        message,
        sender_reached=reached,
        now=NOW,
        policy=policy,
        rng=random.Random(1),
        timing=TIMING,
    )


@settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(-3, 10_000),
    base=st.floats(0.001, 100),
    cap=st.floats(0.001, 10_000),
    seed=st.integers(0, 2**32),
)
def test_backoff_is_full_jitter_within_its_bounds(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    policy = RetryPolicy(max_attempts=5, base_seconds=base, max_seconds=cap)
    delay = policy.backoff(attempt, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(max(attempt, 0), 64))


def test_backoff_spreads_over_the_whole_window() -> None:
    policy = RetryPolicy(base_seconds=1.0, max_seconds=1000.0)
    rng = random.Random(7)
    delays = [policy.backoff(3, rng) for _ in range(2000)]
    assert max(delays) <= 8.0
    assert min(delays) < 0.5  # full jitter reaches down to zero ...
    assert max(delays) > 7.5  # ... and up to the ceiling


@settings(max_examples=200, deadline=None)
@given(retry_after=st.floats(0, 3600), seed=st.integers(0, 2**32))
def test_throttle_delay_adds_at_most_ten_percent(retry_after: float, seed: int) -> None:
    delay = RetryPolicy().throttle_delay(retry_after, random.Random(seed))
    floor = max(retry_after, 0.1)
    assert floor <= delay <= floor * 1.1 + 1e-9


def test_policy_follows_settings() -> None:
    policy = RetryPolicy.from_settings(
        RouterSettings(
            max_attempts=7,
            retry_base_seconds=0.5,
            retry_max_seconds=9.0,
            unknown_outcome_policy="hold",
            unknown_hold_seconds=60.0,
        )
    )
    assert (policy.max_attempts, policy.base_seconds, policy.max_seconds) == (7, 0.5, 9.0)
    assert (policy.unknown, policy.unknown_hold_seconds) == ("hold", 60.0)


def test_accepted_is_sent_with_the_message_id_and_counts_as_attempt() -> None:
    c = resolve(intent(), sender_pb2.SEND_OUTCOME_ACCEPTED, provider_message_id="m-1")
    assert (c.status, c.provider, c.provider_message_id, c.attempted) == (
        "sent",
        "ses",
        "m-1",
        True,
    )
    assert c.outcome == sender_pb2.SEND_OUTCOME_ACCEPTED


def test_throttled_waits_for_retry_after_and_is_not_an_attempt() -> None:
    c = resolve(intent(attempts=2), sender_pb2.SEND_OUTCOME_THROTTLED, retry_after=10.0)
    assert (c.status, c.attempted, c.last_error) == ("pending", False, None)
    assert c.due_at is not None
    assert NOW + timedelta(seconds=10) <= c.due_at <= NOW + timedelta(seconds=11)


def test_transient_retries_with_backoff_until_attempts_run_out() -> None:
    c = resolve(intent(), sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE, reason="503")
    assert (c.status, c.attempted, c.last_error) == ("pending", True, "503")
    assert c.due_at is not None
    assert NOW <= c.due_at <= NOW + timedelta(seconds=2)
    # A provider's retry-after on a transient failure is honoured as a floor.
    c = resolve(intent(), sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE, retry_after=30.0)
    assert c.due_at is not None
    assert c.due_at >= NOW + timedelta(seconds=30)
    c = resolve(
        intent(attempts=POLICY.max_attempts - 1),
        sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE,
        reason="503",
    )
    assert (c.status, c.attempted) == ("failed", True)
    assert c.last_error == "attempts exhausted (3): 503"


def test_permanent_failure_fails_at_once_with_the_reason() -> None:
    c = resolve(intent(), sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE, reason="no such mailbox")
    assert (c.status, c.attempted, c.last_error) == ("failed", True, "no such mailbox")


@pytest.mark.parametrize(
    ("reason", "hard"),
    [
        ("550 5.1.1 user unknown", True),
        ("mailbox does not exist", True),
        ("Recipient address rejected", True),
        ("hard_bounce", True),
        ("552 message too large", False),
        ("content rejected as spam", False),
        ("", False),
    ],
)
def test_hard_bounce_class(reason: str, hard: bool) -> None:
    assert is_hard_bounce(reason) is hard


def test_unknown_outcome_under_retry_spends_an_attempt_and_retries() -> None:
    c = resolve(intent(), sender_pb2.SEND_OUTCOME_UNKNOWN, reason="DEADLINE_EXCEEDED")
    assert (c.status, c.attempted, c.held_for) == ("pending", True, None)
    assert c.outcome == sender_pb2.SEND_OUTCOME_UNKNOWN
    assert c.last_error == "outcome unknown: DEADLINE_EXCEEDED"
    # A batch that kills the sender every time ends after max_attempts, not never.
    c = resolve(intent(attempts=POLICY.max_attempts - 1), sender_pb2.SEND_OUTCOME_UNKNOWN)
    assert (c.status, c.attempted) == ("failed", True)
    assert c.last_error is not None
    assert c.last_error.startswith("attempts exhausted (3): outcome unknown")


def test_unknown_outcome_under_hold_waits_for_reconciliation() -> None:
    hold = RetryPolicy(max_attempts=3, unknown="hold", unknown_hold_seconds=900.0)
    c = resolve(intent(), sender_pb2.SEND_OUTCOME_UNKNOWN, policy=hold)
    assert (c.status, c.attempted, c.held_for) == ("pending", True, RECONCILE)
    assert c.due_at == NOW + timedelta(seconds=900)


def test_unreachable_sender_or_provider_spends_no_attempt_and_is_held_for_its_target() -> None:
    last = intent(attempts=POLICY.max_attempts - 1)
    c = resolve(last, sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE, reached=False, reason="x")
    assert (c.status, c.attempted, c.held_for) == ("pending", False, SENDER_TARGET)
    assert c.due_at == NOW + timedelta(seconds=1.5)
    c = resolve(last, sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE, reason="refused")
    assert (c.status, c.attempted, c.held_for) == ("pending", False, "ses")
    assert c.last_error == "provider unavailable: refused"


def test_results_are_matched_by_intent_id_and_missing_ones_are_unknown() -> None:
    a, b, c = intent(), intent(), intent()
    answer = BatchOutcome(
        "ses",
        {
            str(c.id): MessageOutcome(sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE, reason="bad"),
            str(a.id): MessageOutcome(sender_pb2.SEND_OUTCOME_ACCEPTED, provider_message_id="m"),
        },
    )
    out = resolve_batch(
        (a, b, c), answer, now=NOW, policy=POLICY, rng=random.Random(1), timing=TIMING
    )
    assert [x.intent_id for x in out] == [a.id, b.id, c.id]
    assert [x.status for x in out] == ["sent", "pending", "failed"]
    assert out[1].outcome == sender_pb2.SEND_OUTCOME_UNKNOWN


def test_outage_hold_follows_the_outage_length_not_the_number_of_failed_batches() -> None:
    clock = [100.0]
    outages = OutageClock(
        probe_interval=0.5, hold_max=30.0, rng=random.Random(2), clock=lambda: clock[0]
    )
    for _ in range(50):  # fifty failed batches within the first second
        outages.down("<sender>")
    clock[0] += 1.0
    holds = [outages.hold_seconds("<sender>") for _ in range(100)]
    assert max(holds) <= 1.0  # the old backoff doubled per batch: minutes by now
    assert min(holds) >= 0.5
    clock[0] += 600
    assert max(outages.hold_seconds("<sender>") for _ in range(100)) <= 30.0
    assert outages.up("<sender>")
    assert not outages.up("<sender>")


def test_circuit_opens_below_the_success_rate_then_half_opens_and_closes() -> None:
    clock = [0.0]
    circuits = CircuitBreakers(
        CircuitConfig(min_samples=100, cooldown=30.0, probe_every=1.0, close_after=2),
        clock=lambda: clock[0],
    )
    circuits.record("ses", "marketing", ok=99, failed=1, seconds=0.1)
    assert circuits.state("ses") is CircuitState.CLOSED  # 99 % >= 98 %
    circuits.record("ses", "marketing", ok=0, failed=3, seconds=0.1)
    assert circuits.state("ses") is CircuitState.OPEN  # 99 / 103 < 98 %
    assert circuits.open_providers("marketing") == {"ses"}
    clock[0] += 31
    assert circuits.state("ses") is CircuitState.HALF_OPEN
    # A trickle: one round in each probe interval may use it.
    assert "ses" not in circuits.open_providers("digest")
    assert "ses" in circuits.open_providers("digest")
    circuits.record("ses", "marketing", ok=10, failed=1, seconds=0.1)
    assert circuits.state("ses") is CircuitState.OPEN  # a bad probe opens it again
    clock[0] += 31
    for _ in range(2):
        circuits.record("ses", "marketing", ok=10, failed=0, seconds=0.1)
    assert circuits.state("ses") is CircuitState.CLOSED
    assert circuits.open_providers() == set()


def test_circuit_opens_on_latency_and_per_kind() -> None:
    circuits = CircuitBreakers(CircuitConfig(min_samples=10, max_latency=1.0))
    circuits.record("ses", "digest", ok=20, failed=0, seconds=3.0)
    assert circuits.state("ses", "digest") is CircuitState.OPEN
    assert circuits.state("ses") is CircuitState.OPEN
    assert circuits.state("ses", "marketing") is CircuitState.CLOSED


def test_throttled_transactional_is_never_queued_behind_paced_slots() -> None:
    late = Timing(
        throttle_due=lambda provider, earliest: earliest + timedelta(seconds=100),
        hold_seconds=lambda t: 1.0,
    )
    marketing = intent()
    urgent = dataclasses.replace(marketing, id=uuid.uuid4(), kind="transactional")
    out = {}
    for i in (marketing, urgent):
        out[i.kind] = resolve_message(
            i,
            "ses",
            MessageOutcome(sender_pb2.SEND_OUTCOME_THROTTLED, retry_after=1.0),
            now=NOW,
            policy=POLICY,
            rng=random.Random(1),
            timing=late,
        )
    assert out["marketing"].due_at is not None
    assert out["transactional"].due_at is not None
    assert out["marketing"].due_at >= NOW + timedelta(seconds=100)
    assert out["transactional"].due_at <= NOW + timedelta(seconds=1.2)
