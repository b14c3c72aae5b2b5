"""Routing decisions without I/O: provider choice, batching, backoff, result handling."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.common.providers import DEFAULT_PROVIDERS, ProviderConfig
from sluice.router.outcomes import RetryPolicy, Timing, resolve_batch
from sluice.router.repository import LeasedIntent
from sluice.router.routing import (
    EXPIRED_ERROR,
    MAX_MESSAGES_PER_SEND_BATCH,
    ProviderChooser,
    plan_routes,
)
from sluice.router.sender_client import BatchOutcome, MessageOutcome
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


TIMING = Timing(throttle_due=lambda provider, earliest: earliest, hold_seconds=lambda t: 1.0)


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


def test_a_provider_avoided_for_one_kind_stays_a_candidate_for_the_others() -> None:
    chooser = ProviderChooser(
        [
            provider("cheap", 0.1, ("marketing", "transactional")),
            provider("dear", 0.3, ("marketing", "transactional")),
        ]
    )
    lease = [intent("marketing"), intent("transactional")]
    plan = plan_routes(lease, chooser, now=NOW, avoid={"marketing": {"cheap": "circuit open"}})
    by_kind = {b.intents[0].kind: b for b in plan.batches}
    assert (by_kind["marketing"].provider, by_kind["transactional"].provider) == ("dear", "cheap")
    # Each batch carries the policy's reason for each of its intents.
    assert by_kind["marketing"].reasons == (
        "dear: cheapest that meets the deadline (passed over: cheap circuit open for marketing)",
    )
    assert by_kind["transactional"].reasons == ("cheap: cheapest that meets the deadline",)


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
        sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE,
        sender_pb2.SEND_OUTCOME_UNKNOWN,
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
        messages = {
            str(i.id): MessageOutcome(outcome, retry_after=3)
            for i in batch.intents
            if (outcome := outcome_of[i.id]) is not None
        }
        answer = BatchOutcome(batch.provider, messages, sender_reached=not batch_fails)
        completions += resolve_batch(
            batch.intents, answer, now=NOW, policy=POLICY, rng=rng, timing=TIMING
        )
    ids = [c.intent_id for c in completions]
    assert sorted(ids) == sorted(i.id for i in leased)
    for c in completions:
        assert c.status in {"sent", "pending", "failed", "expired"}
        if c.status == "pending":
            assert c.due_at is not None
            assert c.due_at >= NOW
