"""Intents whose recipient needs SMTPUTF8 go only to providers that take it (pure logic)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

from sluice.common.providers import ProviderConfig, takes_smtputf8
from sluice.router.repository import LeasedIntent
from sluice.router.routing import ProviderChooser, plan_routes

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def provider(name: str, kind: str, cost: float) -> ProviderConfig:
    return ProviderConfig(
        name=name,
        kind=kind,
        cost_per_thousand=cost,
        sustained_rate=0,
        burst=0,
        intents=frozenset({"marketing"}),
    )


def intent(smtputf8: bool) -> LeasedIntent:
    return LeasedIntent(
        id=uuid.uuid4(),
        recipient="josé@example.com" if smtputf8 else "jose@example.com",
        kind="marketing",
        template_id="welcome",
        variables={},
        deadline=NOW + timedelta(hours=1),
        attempts=0,
        idempotency_key=str(uuid.uuid4()),
        traceparent=None,
        campaign_id="c",
        smtputf8=smtputf8,
    )


def able(p: ProviderConfig, value: bool) -> ProviderConfig:
    return dataclasses.replace(p, smtputf8=value)


def test_cheapest_able_provider_takes_smtputf8_intents() -> None:
    cheap = able(provider("cheap", "sandbox", 0.1), False)
    dear = able(provider("dear", "sandbox", 0.5), True)
    plan = plan_routes([intent(True), intent(False)], ProviderChooser([cheap, dear]), now=NOW)
    routed = {b.provider: [i.smtputf8 for i in b.intents] for b in plan.batches}
    assert routed == {"dear": [True], "cheap": [False]}


def test_no_able_provider_fails_the_intent_rather_than_sending_it() -> None:
    plan = plan_routes(
        [intent(True)], ProviderChooser([able(provider("p", "sandbox", 0.1), False)]), now=NOW
    )
    assert not plan.batches
    assert plan.decided[0].status == "failed"


def test_the_flag_is_what_counts() -> None:
    assert takes_smtputf8(able(provider("s", "sandbox", 0.1), True))
    assert not takes_smtputf8(able(provider("s", "sandbox", 0.1), False))
