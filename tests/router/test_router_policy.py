"""The routing policy without I/O: candidates, deadline spill-over, headroom, plan state."""

from __future__ import annotations

import math
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.common.providers import DEFAULT_PROVIDERS, ProviderConfig
from sluice.router.policy import (
    Decision,
    Demand,
    PlanState,
    PolicyConfig,
    ProviderState,
    Verdict,
    decide,
    provider_state,
)
from sluice.router.repository import LeasedIntent
from sluice.router.routing import ProviderChooser, plan_routes

NOW = 1_900_000_000.0
SEED = tuple(provider_state(p) for p in DEFAULT_PROVIDERS)  # ses, resend, sendgrid


def p(name: str, cost: float, rate: float, *kinds: str, **kw: object) -> ProviderState:
    return replace(
        ProviderState(name, cost, rate, int(rate * 2), frozenset(kinds or ("marketing",))), **kw
    )


def demand(kind: str = "marketing", within: float = 3600.0, **kw: Any) -> Demand:
    return Demand(kind=kind, deadline=NOW + within, due=NOW)._replace(**kw)


def run(
    demands: list[Demand],
    providers: tuple[ProviderState, ...] | list[ProviderState] = SEED,
    plan: PlanState | None = None,
    now: float = NOW,
    config: PolicyConfig | None = None,
) -> tuple[list[Decision], PlanState]:
    return decide(demands, providers, plan or PlanState(), now=now, config=config or PolicyConfig())


def routed(decisions: list[Decision]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in decisions:
        if d.verdict is Verdict.ROUTE:
            assert d.provider is not None
            counts[d.provider] = counts.get(d.provider, 0) + 1
    return counts


# ---- found when tried: the demo's campaign all went to ses while sendgrid sat idle --------


def leased(kind: str, deadline: datetime) -> LeasedIntent:
    return LeasedIntent(
        id=uuid.uuid4(),
        recipient="ada@example.com",
        kind=kind,
        template_id="t",
        variables={},
        deadline=deadline,
        attempts=0,
        idempotency_key=uuid.uuid4().hex,
        traceparent=None,
        campaign_id="spring",
    )


def test_a_campaign_ses_alone_cannot_finish_in_time_spills_to_sendgrid() -> None:
    # 1,000 marketing intents due in 40 s: ses (burst 30, then 14/s) sends 576 in time.
    # Cheapest-first sent all 1,000 to ses (72 s) and left sendgrid idle.
    now = datetime.fromtimestamp(NOW, UTC)
    chooser = ProviderChooser(DEFAULT_PROVIDERS)
    intents = [leased("marketing", now + timedelta(seconds=40)) for _ in range(1000)]
    plan = plan_routes(intents, chooser, now=now)
    sent_to: dict[str, int] = {}
    for batch in plan.batches:
        sent_to[batch.provider] = sent_to.get(batch.provider, 0) + len(batch.intents)
    assert sum(sent_to.values()) == 1000
    # What ses sends before the deadline less the margin; the dearer resend is not needed.
    assert sent_to == {"ses": 30 + 14 * 39, "sendgrid": 1000 - 576}
    reasons = {d.reason.partition(" would")[0] for d in plan.decisions.values()}
    assert reasons == {"ses: cheapest that meets the deadline", "sendgrid: spilled: ses"}


def test_a_throttled_intent_leased_again_keeps_its_slot() -> None:
    now = datetime.fromtimestamp(NOW, UTC)
    chooser = ProviderChooser(DEFAULT_PROVIDERS)
    intents = [leased("marketing", now + timedelta(seconds=40)) for _ in range(100)]
    plan_routes(intents, chooser, now=now)
    assert chooser.plan.lanes["ses"] == (100.0, NOW)
    # The sender throttled them and they come back: same slots, the plan does not grow.
    again = plan_routes(intents, chooser, now=now)
    assert chooser.plan.lanes["ses"] == (100.0, NOW)
    assert {d.reason for d in again.decisions.values()} == {"ses: its planned slot"}


def test_a_slot_given_up_shrinks_the_plan() -> None:
    plan = PlanState({"ses": (100.0, NOW)})
    ses_off = [replace(s, enabled=False) if s.name == "ses" else s for s in SEED]
    (d,), after = run([demand(planned_provider="ses")], ses_off, plan)
    assert d.provider == "sendgrid"
    assert after.lanes["ses"] == (99.0, NOW)


def test_routing_uses_only_verified_providers_and_smtputf8_ones_when_needed() -> None:
    now = datetime.fromtimestamp(NOW, UTC)
    ses, resend, sendgrid = DEFAULT_PROVIDERS
    providers = [replace(ses, verified=False), resend, replace(sendgrid, smtputf8=False)]
    chooser = ProviderChooser(providers)
    plain = leased("marketing", now + timedelta(hours=1))
    utf8 = replace(leased("marketing", now + timedelta(hours=1)), recipient="josé@exämple.com")
    plan = plan_routes([plain, utf8], chooser, now=now)
    chosen = {i.id: b.provider for b in plan.batches for i in b.intents}
    # ses is cheapest but unverified; sendgrid next, but it cannot take SMTPUTF8.
    assert chosen == {plain.id: "sendgrid", utf8.id: "resend"}


def test_with_time_to_spare_everything_stays_on_the_cheapest() -> None:
    decisions, _ = run([demand(within=900) for _ in range(10_000)])
    assert routed(decisions) == {"ses": 10_000}
    assert {d.reason for d in decisions} == {"ses: cheapest that meets the deadline"}
    assert decisions[0].cost == pytest.approx(0.10 / 1000)


# ---- candidates ----------------------------------------------------------------------------

BASE = p("cheap", 0.1, 10, "marketing", "transactional")
DEAR = p("dear", 0.3, 10, "marketing", "transactional")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"enabled": False}, "disabled"),
        ({"verified": False}, "sending domain not verified"),
        ({"circuit_open": True}, "circuit open"),
        ({"daily_quota": 100, "quota_used": 100}, "daily quota spent"),
    ],
)
def test_an_unusable_cheap_provider_is_skipped_and_alone_makes_intents_wait(
    change: dict[str, object], why: str
) -> None:
    cheap = replace(BASE, **change)
    (d,), _ = run([demand()], [cheap, DEAR])
    assert (d.verdict, d.provider) == (Verdict.ROUTE, "dear")
    (d,), _ = run([demand()], [cheap])
    assert d.verdict is Verdict.WAIT
    assert d.reason == f"no provider can take intent marketing now: cheap {why}"
    assert d.retry_at == NOW + PolicyConfig().wait_seconds
    assert d.provider is None


def test_kind_and_smtputf8_decide_what_could_ever_be_served() -> None:
    ascii_only = replace(BASE, smtputf8=False)
    (d,), _ = run([demand(needs_smtputf8=True)], [ascii_only, DEAR])
    assert d.provider == "dear"
    (d,), _ = run([demand(needs_smtputf8=True)], [ascii_only])
    assert (d.verdict, d.reason) == (
        Verdict.NEVER,
        "no configured provider supports intent marketing with an SMTPUTF8 address",
    )
    (d,), _ = run([demand("digest")], [BASE, DEAR])
    assert (d.verdict, d.reason) == (Verdict.NEVER, "no configured provider supports intent digest")
    # Disabled is not "never": it may be switched back on.
    (d,), _ = run([demand()], [replace(BASE, enabled=False)])
    assert d.verdict is Verdict.WAIT


def test_quota_counts_within_the_batch() -> None:
    cheap = replace(BASE, daily_quota=10, quota_used=7)
    decisions, _ = run([demand() for _ in range(5)], [cheap, DEAR])
    assert [d.provider for d in decisions] == ["cheap"] * 3 + ["dear"] * 2


def test_degraded_is_a_last_resort() -> None:
    sick = replace(BASE, degraded=True)
    (d,), _ = run([demand()], [sick, DEAR])
    assert d.provider == "dear"
    (d,), _ = run([demand()], [sick])
    assert d.provider == "cheap"


def test_a_provider_closed_to_one_kind_still_takes_the_others() -> None:
    # cheap's circuit for marketing is open: marketing goes to dear, transactional stays.
    cheap = replace(BASE, closed={"marketing": "circuit open"})
    decisions, _ = run([demand(), demand("transactional")], [cheap, DEAR])
    assert [d.provider for d in decisions] == ["dear", "cheap"]
    assert decisions[0].reason == (
        "dear: cheapest that meets the deadline (passed over: cheap circuit open for marketing)"
    )
    assert decisions[1].reason == "cheap: cheapest that meets the deadline"
    (alone,), _ = run([demand()], [cheap])
    assert alone.verdict is Verdict.WAIT
    assert alone.reason == (
        "no provider can take intent marketing now: cheap circuit open for marketing"
    )


def test_the_reason_names_cheaper_providers_passed_over_and_why() -> None:
    sick = replace(BASE, degraded=True)
    spent = p("spent", 0.05, 10, daily_quota=5, quota_used=5)
    off = p("off", 0.01, 10, enabled=False)  # configuration, not news: not named
    (d,), _ = run([demand()], [sick, spent, off, DEAR])
    assert d.reason == (
        "dear: cheapest that meets the deadline"
        " (passed over: spent daily quota spent, cheap degraded)"
    )


def test_a_router_plans_with_its_share_of_each_provider() -> None:
    # Two routers: each plans 5/s and a burst of 10 on cheap (10/s, burst 20), so their
    # plans together never exceed what cheap can send before the deadline.
    half = replace(BASE, share=0.5)
    decisions, _ = run([demand(within=11) for _ in range(100)], [half, DEAR])
    assert routed(decisions)["cheap"] == 10 + 5 * 10
    decisions, _ = run([demand(within=11) for _ in range(200)], [BASE, DEAR])
    assert routed(decisions)["cheap"] == 20 + 10 * 10


def test_unlimited_provider_never_builds_a_backlog() -> None:
    free = p("free", 0.0, 0, burst=0)
    decisions, plan = run([demand(within=2) for _ in range(5000)], [free, DEAR])
    assert routed(decisions) == {"free": 5000}
    assert "free" not in plan.lanes
    assert "dear" not in plan.lanes


# ---- deadlines and spill-over ---------------------------------------------------------------


def test_no_provider_in_time_goes_to_the_one_finishing_first() -> None:
    slow = p("slow", 0.1, 1)
    fast = p("fast", 0.5, 100)
    plan = PlanState({"fast": (1000.0, NOW), "slow": (1000.0, NOW)})
    (d,), _ = run([demand(within=5)], [slow, fast], plan)
    assert d.provider == "fast"
    assert d.reason == "fast: no provider meets the deadline; fast finishes first"
    assert d.finish == pytest.approx(NOW + 1001 / 100)


def test_transactional_keeps_headroom_on_its_only_provider() -> None:
    # A campaign that fits: resend takes marketing only up to its share (85 % of 10/s).
    decisions, _ = run([demand(within=60) for _ in range(2000)])
    ses, sendgrid = 30 + 14 * 59, 25 + 12 * 59
    assert routed(decisions) == {"ses": ses, "sendgrid": sendgrid, "resend": 2000 - ses - sendgrid}
    assert routed(decisions)["resend"] <= 0.85 * (20 + 10 * 59)
    # A flood no provider can finish in time still leaves resend's reserve: transactional
    # mail planned afterwards meets a 10 s deadline there; without the reserve it would not.
    flood = [demand(within=60) for _ in range(5000)]
    for reserve, in_time in ((0.15, True), (0.0, False)):
        config = PolicyConfig(reserve=reserve)
        _, plan = run(flood, config=config)
        txs, _ = run(
            [demand("transactional", within=10) for _ in range(9)], plan=plan, config=config
        )
        assert {t.provider for t in txs} == {"resend"}
        assert all(t.finish <= NOW + 9 for t in txs) is in_time


def test_no_reserve_when_transactional_has_two_paths() -> None:
    second = p("postmark", 0.5, 10, "transactional")
    room = {"ses": 30 + 14 * 59, "sendgrid": 25 + 12 * 59, "resend": 20 + 10 * 59}
    decisions, _ = run([demand(within=60) for _ in range(sum(room.values()))], (*SEED, second))
    assert routed(decisions) == room


def test_the_plan_is_shared_across_batches_and_drains_with_time() -> None:
    one, _ = run([demand(within=40) for _ in range(1000)])
    first, plan = run([demand(within=40) for _ in range(500)])
    second, plan = run([demand(within=40) for _ in range(500)], plan=plan)
    assert routed(one) == {
        k: routed(first).get(k, 0) + routed(second).get(k, 0) for k in routed(one)
    }
    # 100 s later ses's 576 planned messages have gone out: it is free again.
    later, _ = run([demand(within=40)], plan=plan, now=NOW + 100)
    assert later[0].provider == "ses"
    assert plan.backlog("ses", NOW + 10, 14) == pytest.approx(576 - 140)


def test_a_provider_that_is_down_does_not_drain_its_plan() -> None:
    plan = PlanState({"ses": (140.0, NOW)})
    down = [replace(s, circuit_open=True) if s.name == "ses" else s for s in SEED]
    _, plan = run([], down, plan, now=NOW + 60)
    assert plan.lanes["ses"] == (140.0, NOW + 60)


def test_a_planned_intent_claims_its_slot_instead_of_counting_twice() -> None:
    plan = PlanState({"ses": (13.0 * 40, NOW)})
    (d,), after = run([demand(within=40, planned_provider="ses")], plan=plan)
    assert (d.provider, d.reason) == ("ses", "ses: its planned slot")
    assert after.lanes["ses"] == (13.0 * 40, NOW)
    (d,), after = run([demand(within=40)], plan=plan)
    assert d.provider == "ses"
    assert after.lanes["ses"] == (13.0 * 40 + 1, NOW)


def test_waits_for_a_cheaper_provider_when_waiting_is_free() -> None:
    ses_down = [
        replace(s, circuit_open=True, available_at=NOW + 30) if s.name == "ses" else s for s in SEED
    ]
    (d,), plan = run([demand(within=900)], ses_down)
    assert (d.verdict, d.provider, d.retry_at) == (Verdict.WAIT, "ses", NOW + 30)
    assert "cheaper than sendgrid" in d.reason
    assert plan.lanes["ses"][0] == 1.0  # its slot is reserved
    # With too little time to wait, it goes to sendgrid now.
    (d,), _ = run([demand(within=20)], ses_down)
    assert (d.verdict, d.provider) == (Verdict.ROUTE, "sendgrid")


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="reserve"):
        PolicyConfig(reserve=1.0)
    with pytest.raises(ValueError, match="wait_seconds"):
        PolicyConfig(wait_seconds=0)


def test_provider_state_carries_the_configured_fields() -> None:
    config = ProviderConfig(
        "x",
        "sandbox",
        0.1,
        5,
        10,
        frozenset({"digest"}),
        enabled=False,
        verified=False,
        smtputf8=True,
        daily_quota=7,
    )
    state = provider_state(config, quota_used=3, circuit_open=True, available_at=NOW)
    assert (state.verified, state.smtputf8, state.daily_quota) == (False, True, 7)
    assert (state.enabled, state.quota_used, state.circuit_open) == (False, 3, True)
    assert state.rate == 5


# ---- properties -------------------------------------------------------------------------------

KINDS = ("transactional", "marketing", "digest")
providers_st = st.lists(
    st.builds(
        ProviderState,
        name=st.sampled_from(["a", "b", "c", "d", "e"]),
        cost_per_thousand=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.5]),
        sustained_rate=st.sampled_from([0.0, 1.0, 5.0, 14.0]),
        burst=st.sampled_from([0, 10]),
        intents=st.frozensets(st.sampled_from(KINDS), min_size=1),
        enabled=st.booleans(),
        verified=st.booleans(),
        smtputf8=st.booleans(),
        daily_quota=st.sampled_from([0, 0, 5, 50]),
        quota_used=st.integers(0, 60),
        circuit_open=st.booleans(),
        degraded=st.booleans(),
        available_at=st.sampled_from([None, NOW + 5, NOW + 120]),
        closed=st.dictionaries(st.sampled_from(KINDS), st.just("circuit open"), max_size=2),
        share=st.sampled_from([1.0, 1.0, 0.5, 1 / 3]),
    ),
    max_size=5,
    unique_by=lambda s: s.name,
)
demands_st = st.lists(
    st.builds(
        Demand,
        kind=st.sampled_from(KINDS),
        deadline=st.floats(NOW + 0.5, NOW + 2000),
        due=st.just(NOW),
        needs_smtputf8=st.booleans(),
        planned_provider=st.sampled_from([None, "a", "b"]),
    ),
    max_size=60,
)
plans_st = st.dictionaries(
    st.sampled_from(["a", "b", "c", "a!reserved"]),
    st.tuples(st.floats(0, 5000), st.floats(NOW - 500, NOW)),
).map(PlanState)


def usable(s: ProviderState) -> bool:
    spent = s.daily_quota > 0 and s.quota_used >= s.daily_quota
    return s.enabled and s.verified and not s.circuit_open and not spent


@settings(max_examples=300, deadline=None)
@given(providers=providers_st, demands=demands_st, plan=plans_st)
def test_every_decision_is_one_a_rule_allows(
    providers: list[ProviderState], demands: list[Demand], plan: PlanState
) -> None:
    decisions, after = run(demands, providers, plan)
    assert len(decisions) == len(demands)
    by_name = {s.name: s for s in providers}
    for d, want in zip(decisions, demands, strict=True):
        could = [s for s in providers if s.serves(want.kind, want.needs_smtputf8)]
        if d.verdict is Verdict.NEVER:
            assert not could
            assert d.provider is None
            continue
        assert could
        assert d.provider is None or d.provider in {s.name for s in could}
        if d.verdict is Verdict.ROUTE:
            chosen = by_name[d.provider or ""]
            assert usable(chosen)
            assert want.kind not in chosen.closed
            assert d.cost == pytest.approx(chosen.cost_per_thousand / 1000)
            if chosen.degraded:
                healthy = [
                    s for s in could if usable(s) and not s.degraded and want.kind not in s.closed
                ]
                assert not healthy
        else:
            assert d.retry_at > NOW
            if d.provider is not None:  # waiting for a cheaper one that comes back
                assert by_name[d.provider].circuit_open
    for backlog, as_of in after.lanes.values():
        assert backlog >= 0
        assert as_of <= NOW


@settings(max_examples=300, deadline=None)
@given(providers=providers_st, want=demands_st.filter(bool).map(lambda ds: ds[0]), plan=plans_st)
def test_one_intent_goes_to_the_cheapest_candidate_that_meets_its_deadline(
    providers: list[ProviderState], want: Demand, plan: PlanState
) -> None:
    """A reference model of the rule for one intent with no reserve, no waiting, no slot."""
    config = PolicyConfig(reserve=0.0)
    providers = [replace(s, degraded=False, available_at=None) for s in providers]
    want = want._replace(planned_provider=None)
    (d,), _ = run([want], providers, plan, config=config)
    cands = sorted(
        (
            s
            for s in providers
            if usable(s) and s.serves(want.kind, want.needs_smtputf8) and want.kind not in s.closed
        ),
        key=lambda s: (s.cost_per_thousand, s.name),
    )
    if not cands:
        assert d.verdict is not Verdict.ROUTE
        return

    def finish(s: ProviderState) -> float:
        if math.isinf(s.rate):
            return NOW
        rate = s.rate * s.share
        return NOW + max(0.0, plan.backlog(s.name, NOW, rate) + 1 - s.burst * s.share) / rate

    in_time = [s for s in cands if finish(s) <= want.deadline - config.margin_seconds]
    expected = in_time[0] if in_time else min(cands, key=finish)
    assert d.provider == expected.name
    assert d.finish == pytest.approx(finish(expected))


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 3000),
    within=st.integers(2, 600),
    rates=st.lists(st.sampled_from([1.0, 5.0, 10.0, 14.0]), min_size=1, max_size=4),
)
def test_a_batch_fills_providers_cheapest_first_up_to_what_meets_the_deadline(
    n: int, within: int, rates: list[float]
) -> None:
    providers = [p(f"p{i}", 0.1 * (i + 1), r) for i, r in enumerate(rates)]
    decisions, _ = run([demand(within=within) for _ in range(n)], providers)
    counts = routed(decisions)
    assert sum(counts.values()) == n
    rooms = [s.burst + int(s.rate * (within - 1)) for s in providers]
    if sum(rooms) >= n:
        left = n
        for s, room in zip(providers, rooms, strict=True):
            assert counts.get(s.name, 0) == min(left, room)
            left -= min(left, room)
        assert all(d.finish <= NOW + within - 1 for d in decisions)
    else:
        # Too much for everyone: each is filled to what it can do in time, then beyond.
        for s, room in zip(providers, rooms, strict=True):
            assert counts.get(s.name, 0) >= room
