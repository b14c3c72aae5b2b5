"""The demo's spill-over: generated campaigns carry a deadline ses alone cannot meet, and
the summary's reasons come from the routing policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sluice.cli.demo_campaign import campaign_items
from sluice.cli.demo_spill import (
    campaign_deadline,
    explain_routing,
    new_campaign_id,
    spill_window,
)
from sluice.common.model import KIND_TO_PROTO
from sluice.common.providers import DEFAULT_PROVIDERS
from sluice.v1 import router_pb2

PROVIDERS = [
    router_pb2.Provider(
        name=p.name,
        cost_per_thousand=p.cost_per_thousand,
        sustained_rate=p.sustained_rate,
        burst=p.burst,
        intents=[KIND_TO_PROTO[k] for k in sorted(p.intents)],
        enabled=p.enabled,
    )
    for p in DEFAULT_PROVIDERS
]


def test_a_generated_campaign_carries_its_deadline_and_a_named_one_does_not() -> None:
    campaign = new_campaign_id(1000)
    deadline = campaign_deadline(campaign)
    assert deadline is not None
    now = datetime.now(UTC)
    assert now < deadline <= now + timedelta(seconds=spill_window(1000) + 1)
    assert campaign_deadline("spring-sale") is None
    assert campaign_deadline("demo-20260101-000000-wxx-abcd") is None
    items = campaign_items(campaign, 20)
    kinds = {KIND_TO_PROTO["marketing"], KIND_TO_PROTO["digest"]}
    for item in items:
        assert item.HasField("deadline") == (item.intent in kinds)
    # Items stay a pure function of (campaign, index): a re-run is a retry.
    assert campaign_items(campaign, 20) == items
    assert not any(i.HasField("deadline") for i in campaign_items("spring-sale", 20))


def test_the_summary_explains_a_spill_to_the_next_cheapest() -> None:
    for count in (300, 1000):
        campaign = new_campaign_id(count)
        items = campaign_items(campaign, count)
        lines = explain_routing(PROVIDERS, items, datetime.now(UTC))
        by_reason = {
            line.split(maxsplit=1)[1].split(" would")[0]: int(line.split()[0]) for line in lines
        }
        assert set(by_reason) == {
            "ses: cheapest that meets the deadline",
            "sendgrid: spilled: ses",
            "resend: cheapest that meets the deadline",  # transactional: its only provider
        }, lines
        assert sum(by_reason.values()) == count - 2  # two invalid addresses
        # ses sends the larger part, sendgrid what ses could not finish in time.
        assert (
            by_reason["ses: cheapest that meets the deadline"]
            > by_reason["sendgrid: spilled: ses"]
            > 0
        )
