"""Routing decisions without I/O: provider choice, batching, backoff, result handling."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import duration_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.common.providers import DEFAULT_PROVIDERS, ProviderConfig
from sluice.router.repository import LeasedIntent
from sluice.router.routing import (
    EXPIRED_ERROR,
    MAX_MESSAGES_PER_SEND_BATCH,
    OutageBackoff,
    PlannedBatch,
    ProviderChooser,
    RetryPolicy,
    plan_routes,
    resolve_batch,
    resolve_batch_failure,
    resolve_result,
)
from sluice.router.settings import RouterSettings
from sluice.v1 import sender_pb2

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=3, base_seconds=2.0, max_seconds=60.0)


def provider(
    name: str, cost: float, intents: tuple[str, ...], *, enabled: bool = True
) -> ProviderConfig:
    return ProviderConfig(
        name=name,
        kind="sandbox",
        cost_per_thousand=cost,
        sustained_rate=0,
        burst=0,
        intents=frozenset(intents),
        enabled=enabled,
    )


def intent(
    kind: str = "marketing",
    *,
    template_id: str = "welcome",
    attempts: int = 0,
    deadline: datetime = NOW + timedelta(hours=1),
) -> LeasedIntent:
    return LeasedIntent(
        id=uuid.uuid4(),
        recipient="alice@example.com",
        kind=kind,
        template_id=template_id,
        variables={"name": "Alice"},
        deadline=deadline,
        attempts=attempts,
        idempotency_key=uuid.uuid4().hex,
        traceparent=None,
        campaign_id="c",
    )


def result(
    target: LeasedIntent,
    outcome: sender_pb2.SendOutcome.ValueType,
    *,
    retry_after: float | None = None,
    reason: str = "",
    message_id: str = "",
) -> sender_pb2.SendResult:
    r = sender_pb2.SendResult(
        intent_id=str(target.id), outcome=outcome, reason=reason, provider_message_id=message_id
    )
    if retry_after is not None:
        r.retry_after.CopyFrom(duration_pb2.Duration(seconds=int(retry_after)))
    return r


# ---- provider choice --------------------------------------------------------------------


def test_default_providers_route_each_kind_to_the_cheapest_compatible() -> None:
    chooser = ProviderChooser(DEFAULT_PROVIDERS)
    assert chooser.choose("marketing").name == "ses"  # type: ignore[union-attr]
    assert chooser.choose("digest").name == "ses"  # type: ignore[union-attr]
    assert chooser.choose("transactional").name == "resend"  # type: ignore[union-attr]
    assert [p.name for p in chooser.candidates("marketing")] == ["ses", "sendgrid", "resend"]


def test_equal_cost_is_broken_by_name_and_disabled_providers_are_skipped() -> None:
    chooser = ProviderChooser(
        [
            provider("zeta", 0.1, ("marketing",)),
            provider("alpha", 0.1, ("marketing",)),
            provider("cheapest", 0.01, ("marketing",), enabled=False),
        ]
    )
    assert chooser.choose("marketing").name == "alpha"  # type: ignore[union-attr]
    assert chooser.choose("digest") is None


def test_degraded_provider_is_avoided_only_while_a_healthy_one_exists() -> None:
    chooser = ProviderChooser(
        [provider("cheap", 0.1, ("marketing", "digest")), provider("dear", 0.3, ("marketing",))]
    )
    degraded = frozenset({"cheap"})
    assert chooser.choose("marketing", degraded).name == "dear"  # type: ignore[union-attr]
    # No healthy alternative for digest: a struggling provider beats not sending at all.
    assert chooser.choose("digest", degraded).name == "cheap"  # type: ignore[union-attr]


# ---- planning ----------------------------------------------------------------------------


def test_an_intent_without_provider_fails_alone_and_the_rest_is_batched() -> None:
    chooser = ProviderChooser([provider("cheap", 0.1, ("marketing",))])
    ok = [intent() for _ in range(3)]
    orphan = intent("transactional")
    plan = plan_routes([ok[0], orphan, ok[1], ok[2]], chooser, now=NOW)
    assert [c.intent_id for c in plan.decided] == [orphan.id]
    assert plan.decided[0].status == "failed"
    assert plan.decided[0].last_error == "no configured provider supports intent transactional"
    assert len(plan.batches) == 1
    assert {i.id for i in plan.batches[0].intents} == {i.id for i in ok}


def test_an_intent_past_its_deadline_expires_without_a_batch() -> None:
    chooser = ProviderChooser(DEFAULT_PROVIDERS)
    late = intent(deadline=NOW - timedelta(seconds=1))
    plan = plan_routes([late], chooser, now=NOW)
    assert plan.batches == ()
    assert len(plan.decided) == 1
    assert plan.decided[0].status == "expired"
    assert plan.decided[0].last_error == EXPIRED_ERROR
    assert not plan.decided[0].attempted


def test_batches_are_per_provider_and_template_and_chunked() -> None:
    chooser = ProviderChooser(DEFAULT_PROVIDERS)
    intents = [intent(template_id="a") for _ in range(5)]
    intents += [intent(template_id="b") for _ in range(2)]
    intents += [intent("transactional", template_id="a")]
    plan = plan_routes(intents, chooser, now=NOW, max_messages=2)
    shapes = sorted((b.provider, b.template_id, len(b.intents)) for b in plan.batches)
    assert shapes == [
        ("resend", "a", 1),
        ("ses", "a", 1),
        ("ses", "a", 2),
        ("ses", "a", 2),
        ("ses", "b", 2),
    ]
    # Transactional intents are routed first whatever the lease order.
    assert plan.batches[0].provider == "resend"


def test_router_side_chunk_is_500() -> None:
    chooser = ProviderChooser(DEFAULT_PROVIDERS)
    plan = plan_routes([intent() for _ in range(1001)], chooser, now=NOW)
    assert [len(b.intents) for b in plan.batches] == [500, 500, 1]
    assert MAX_MESSAGES_PER_SEND_BATCH == 500


kinds = st.sampled_from(["transactional", "marketing", "digest"])
provider_sets = st.lists(
    st.builds(
        provider,
        name=st.text("abcdef", min_size=1, max_size=4),
        cost=st.floats(0, 1),
        intents=st.lists(kinds, unique=True).map(tuple),
        enabled=st.booleans(),
    ),
    max_size=4,
    unique_by=lambda p: p.name,
)
outcomes = st.sampled_from(
    [
        sender_pb2.SEND_OUTCOME_ACCEPTED,
        sender_pb2.SEND_OUTCOME_THROTTLED,
        sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE,
        sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE,
        sender_pb2.SEND_OUTCOME_UNSPECIFIED,
        None,  # the sender gave no result for this message
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    providers=provider_sets,
    specs=st.lists(
        st.tuples(kinds, st.sampled_from(["a", "b"]), st.integers(0, 4), st.booleans(), outcomes),
        max_size=40,
    ),
    max_messages=st.integers(1, 7),
    degraded=st.frozensets(st.text("abcdef", min_size=1, max_size=4), max_size=2),
    batch_fails=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_every_leased_intent_gets_exactly_one_completion(
    providers: list[ProviderConfig],
    specs: list[tuple[str, str, int, bool, sender_pb2.SendOutcome.ValueType | None]],
    max_messages: int,
    degraded: frozenset[str],
    batch_fails: bool,
    seed: int,
) -> None:
    rng = random.Random(seed)
    leased = []
    outcome_of = {}
    for kind, template, attempts, late, outcome in specs:
        deadline = NOW - timedelta(seconds=1) if late else NOW + timedelta(hours=1)
        i = intent(kind, template_id=template, attempts=attempts, deadline=deadline)
        leased.append(i)
        outcome_of[i.id] = outcome
    chooser = ProviderChooser(providers)
    plan = plan_routes(leased, chooser, now=NOW, degraded=degraded, max_messages=max_messages)
    completions = list(plan.decided)
    for batch in plan.batches:
        assert 1 <= len(batch.intents) <= max_messages
        assert {i.template_id for i in batch.intents} == {batch.template_id}
        for i in batch.intents:
            assert batch.provider in {p.name for p in chooser.candidates(i.kind)}
        if batch_fails:
            completions += resolve_batch_failure(batch, "down", now=NOW, policy=POLICY, rng=rng)
            continue
        results = [
            result(i, outcome, retry_after=3)
            for i in batch.intents
            if (outcome := outcome_of[i.id]) is not None
        ]
        rng.shuffle(results)
        completions += resolve_batch(batch, results, now=NOW, policy=POLICY, rng=rng)
    ids = [c.intent_id for c in completions]
    assert sorted(ids) == sorted(i.id for i in leased)
    for c in completions:
        assert c.status in {"sent", "pending", "failed", "expired"}
        if c.status == "pending":
            assert c.due_at is not None
            assert c.due_at >= NOW


# ---- backoff -----------------------------------------------------------------------------


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
    bound = min(cap, base * 2.0 ** min(max(attempt, 0), 64))
    assert 0.0 <= delay <= bound


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
        RouterSettings(max_attempts=7, retry_base_seconds=0.5, retry_max_seconds=9.0)
    )
    assert (policy.max_attempts, policy.base_seconds, policy.max_seconds) == (7, 0.5, 9.0)


# ---- results -----------------------------------------------------------------------------


def test_accepted_is_sent_with_the_message_id_and_counts_as_attempt() -> None:
    i = intent()
    c = resolve_result(
        i,
        "ses",
        result(i, sender_pb2.SEND_OUTCOME_ACCEPTED, message_id="m-1"),
        now=NOW,
        policy=POLICY,
        rng=random.Random(1),
    )
    assert (c.status, c.provider, c.provider_message_id, c.attempted) == (
        "sent",
        "ses",
        "m-1",
        True,
    )
    assert c.due_at is None


def test_throttled_waits_for_retry_after_and_is_not_an_attempt() -> None:
    i = intent(attempts=2)
    c = resolve_result(
        i,
        "ses",
        result(i, sender_pb2.SEND_OUTCOME_THROTTLED, retry_after=10),
        now=NOW,
        policy=POLICY,
        rng=random.Random(1),
    )
    assert c.status == "pending"
    assert not c.attempted
    assert c.due_at is not None
    assert NOW + timedelta(seconds=10) <= c.due_at <= NOW + timedelta(seconds=11)


def test_transient_retries_with_backoff_until_attempts_run_out() -> None:
    rng = random.Random(3)
    first = intent(attempts=0)
    c = resolve_result(
        first,
        "ses",
        result(first, sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE, reason="503"),
        now=NOW,
        policy=POLICY,
        rng=rng,
    )
    assert (c.status, c.attempted, c.last_error) == ("pending", True, "503")
    assert c.due_at is not None
    assert NOW <= c.due_at <= NOW + timedelta(seconds=2)

    # A provider's retry-after on a transient failure is honoured as a floor.
    c = resolve_result(
        first,
        "ses",
        result(first, sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE, retry_after=30),
        now=NOW,
        policy=POLICY,
        rng=rng,
    )
    assert c.due_at is not None
    assert c.due_at >= NOW + timedelta(seconds=30)

    last = intent(attempts=POLICY.max_attempts - 1)
    c = resolve_result(
        last,
        "ses",
        result(last, sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE, reason="503"),
        now=NOW,
        policy=POLICY,
        rng=rng,
    )
    assert (c.status, c.attempted) == ("failed", True)
    assert c.last_error is not None
    assert "attempts exhausted (3)" in c.last_error
    assert "503" in c.last_error


def test_permanent_failure_fails_with_the_reason() -> None:
    i = intent()
    c = resolve_result(
        i,
        "ses",
        result(i, sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE, reason="no such mailbox"),
        now=NOW,
        policy=POLICY,
        rng=random.Random(1),
    )
    assert (c.status, c.attempted, c.last_error) == ("failed", True, "no such mailbox")


@pytest.mark.parametrize("outcome", [sender_pb2.SEND_OUTCOME_UNSPECIFIED, None])
def test_unknown_or_missing_result_is_a_transient_attempt(
    outcome: sender_pb2.SendOutcome.ValueType | None,
) -> None:
    i = intent()
    r = None if outcome is None else result(i, outcome)
    c = resolve_result(i, "ses", r, now=NOW, policy=POLICY, rng=random.Random(1))
    assert (c.status, c.attempted) == ("pending", True)


def test_results_are_matched_by_intent_id_not_position() -> None:
    chooser = ProviderChooser(DEFAULT_PROVIDERS)
    a, b, c = intent(), intent(), intent()
    (batch,) = plan_routes([a, b, c], chooser, now=NOW).batches
    results = [
        result(c, sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE, reason="bad"),
        result(a, sender_pb2.SEND_OUTCOME_ACCEPTED, message_id="m-a"),
    ]
    by_id = {
        x.intent_id: x
        for x in resolve_batch(batch, results, now=NOW, policy=POLICY, rng=random.Random(1))
    }
    assert by_id[a.id].status == "sent"
    assert by_id[a.id].provider_message_id == "m-a"
    assert by_id[b.id].status == "pending"  # no result: transient
    assert by_id[c.id].status == "failed"


def test_whole_batch_failure_is_a_transient_attempt_for_each_message() -> None:
    chooser = ProviderChooser(DEFAULT_PROVIDERS)
    fresh, tired = intent(attempts=0), intent(attempts=POLICY.max_attempts - 1)
    (batch,) = plan_routes([fresh, tired], chooser, now=NOW).batches
    out = {
        c.intent_id: c
        for c in resolve_batch_failure(
            batch, "UNAVAILABLE", now=NOW, policy=POLICY, rng=random.Random(1)
        )
    }
    assert out[fresh.id].status == "pending"
    assert out[fresh.id].attempted
    assert out[tired.id].status == "failed"
    assert out[tired.id].attempted


def test_unreachable_sender_spends_no_attempt() -> None:
    # A sender outage (UNAVAILABLE before anything reached a provider) must never exhaust
    # attempts: at the last attempt, it still goes back to pending with backoff.
    last = intent(attempts=POLICY.max_attempts - 1)
    batch = PlannedBatch(provider="ses", template_id="welcome", intents=(last,))
    rng = random.Random(1)
    [c] = resolve_batch_failure(
        batch, "down", now=NOW, policy=POLICY, rng=rng, reached_provider=False
    )
    assert c.status == "pending"
    assert not c.attempted
    assert c.due_at is not None
    assert c.due_at >= NOW
    [reached] = resolve_batch_failure(batch, "timeout", now=NOW, policy=POLICY, rng=rng)
    assert reached.status == "failed"
    assert reached.attempted


def test_provider_unavailable_spends_no_attempt_and_backs_off_per_provider() -> None:
    policy = RetryPolicy(max_attempts=3, base_seconds=1.0, max_seconds=64.0)
    outage = OutageBackoff(policy)
    last = intent(attempts=policy.max_attempts - 1)
    unavailable = sender_pb2.SendResult(
        intent_id=str(last.id),
        outcome=sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE,
        reason="connection refused",
    )
    rng = random.Random(3)
    for _ in range(6):
        outage.record("ses", reachable=False)
    c = resolve_result(last, "ses", unavailable, now=NOW, policy=policy, rng=rng, outage=outage)
    assert c.status == "pending"
    assert not c.attempted
    assert c.last_error == "provider unavailable: connection refused"
    # A streak of 6 unreachable batches: the delay is drawn from U(0, min(64, 1 * 2**5)).
    delays = [outage.delay("ses", rng) for _ in range(200)]
    assert max(delays) > 16
    assert max(delays) <= 32
    outage.record("ses", reachable=True)
    assert max(outage.delay("ses", rng) for _ in range(200)) <= 1.0
