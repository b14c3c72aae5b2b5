"""Properties over many inputs: SendGrid packing, Resend keys, strict config parsing, the
limits SES's account figures seed."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.common.errors import ConfigError
from sluice.common.providers import ProviderConfig, SesSettings, parse_providers
from sluice.sender.providers.resend import idempotency_key
from sluice.sender.providers.sendgrid import PERSONALIZATION_LIMIT, pack
from sluice.sender.providers.ses import SendQuota, seeded_limits
from tests.adapters.messages import email

recipients = st.sampled_from([f"r{i}@example.com" for i in range(30)] + ["R1@EXAMPLE.com"])
bodies = st.sampled_from(["<p>a</p>", "<p>b</p>", "<p>c</p>"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(recipients, bodies), max_size=120))
def test_sendgrid_packing_keeps_every_message_once_in_valid_requests(
    specs: list[tuple[str, str]],
) -> None:
    messages = [email(f"i{n}", r, html=h) for n, (r, h) in enumerate(specs)]
    requests = [[messages[i] for i in call] for call in pack(messages)]
    flat = [m.intent_id for request in requests for m in request]
    assert sorted(flat) == sorted(m.intent_id for m in messages)
    for request in requests:
        assert 0 < len(request) <= PERSONALIZATION_LIMIT
        assert len({m.html for m in request}) == 1
        addresses = [m.recipient.lower() for m in request]
        assert len(addresses) == len(set(addresses))
    # Within one content, order is kept (a later message never jumps an earlier one).
    for html in {m.html for m in messages}:
        same = [m.intent_id for m in messages if m.html == html]
        assert [i for i in flat if i in set(same)] == same


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(recipients, bodies), min_size=1, max_size=120), st.data())
def test_sendgrid_packs_what_the_limiter_granted_of_a_plan_into_the_same_calls(
    specs: list[tuple[str, str]], data: st.DataObject
) -> None:
    """The servicer reserves the plan's first k calls (the last possibly cut short) and
    hands the adapter just those messages: packing them again must make those k calls."""
    messages = [email(f"i{n}", r, html=h) for n, (r, h) in enumerate(specs)]
    plan = pack(messages)
    k = data.draw(st.integers(1, len(plan)))
    cut = data.draw(st.integers(1, len(plan[k - 1])))
    calls = [*plan[: k - 1], plan[k - 1][:cut]]
    chosen = sorted(i for call in calls for i in call)
    again = pack([messages[i] for i in chosen])
    assert [[chosen[i] for i in call] for call in again] == calls


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=400), min_size=1, max_size=120, unique=True))
def test_resend_keys_are_stable_bounded_and_distinct(ids: list[str]) -> None:
    messages = [dataclasses.replace(email(f"i{n}"), idempotency_key=k) for n, k in enumerate(ids)]
    key = idempotency_key(messages)
    assert key == idempotency_key(list(messages))
    assert 1 <= len(key) <= 256
    if len(messages) > 1:
        assert key != idempotency_key(messages[:-1])


values = st.one_of(
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=False, width=32),
    st.text(max_size=5),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers()),
)
keys = st.sampled_from(
    [
        "name",
        "kind",
        "cost_per_thousand",
        "sustained_rate",
        "burst",
        "intents",
        "enabled",
        "max_batch_size",
        "verified",
        "smtputf8",
        "requests_per_second",
        "request_burst",
        "daily_quota",
        "settings",
        "brust",
        "options",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=8))
def test_any_providers_table_parses_or_is_a_config_error(raw: dict[str, Any]) -> None:
    entry = {"name": "p", "cost_per_thousand": 0.1, "intents": ["marketing"], **raw}
    try:
        [config] = parse_providers({"providers": [entry]})
    except ConfigError:
        return
    # Whatever parsed kept every limit it was given, with its exact type.
    for key in ("burst", "request_burst", "daily_quota", "max_batch_size"):
        if key in raw:
            assert getattr(config, key) == raw[key]
            assert type(raw[key]) is int
    for key in ("enabled", "verified", "smtputf8"):
        if key in raw:
            assert getattr(config, key) is raw[key]


_rates = st.one_of(st.just(0.0), st.floats(0.1, 500, allow_nan=False))
_account = st.one_of(st.just(0.0), st.just(-1.0), st.floats(0.1, 1e6, allow_nan=False))


@settings(max_examples=300, deadline=None)
@given(
    rate=_rates,
    burst=st.integers(0, 600),
    daily=st.integers(0, 10**6),
    max_send_rate=_account,
    max_24=_account,
)
def test_seeded_ses_limits_are_never_above_the_configuration_nor_the_account(
    rate: float, burst: int, daily: int, max_send_rate: float, max_24: float
) -> None:
    if burst and rate > burst:
        rate = float(burst)  # what parsing would refuse
    configured = ProviderConfig(
        name="ses",
        kind="ses",
        cost_per_thousand=0.1,
        sustained_rate=rate,
        burst=burst,
        intents=frozenset({"marketing"}),
        daily_quota=daily,
        settings=SesSettings(region="eu-west-1", read_quota=True),
    )
    quota = SendQuota(max_24, max_send_rate, 0.0, sending_enabled=True)
    seeded = seeded_limits(configured, quota)
    # Only the two figures change, never up where configured, never above the account.
    assert dataclasses.replace(seeded, sustained_rate=rate, daily_quota=daily) == configured
    bounds = [x for x in (rate, float(burst)) if x > 0]
    for bound in bounds:
        assert seeded.sustained_rate <= bound
    if max_send_rate > 0 and (not bounds or max_send_rate < min(bounds)):
        assert seeded.sustained_rate == max_send_rate  # the account is the tighter limit
    else:
        assert seeded.sustained_rate == rate
    if daily > 0:
        assert seeded.daily_quota <= daily
    if max_24 > 0 and (daily == 0 or max_24 < daily):
        assert seeded.daily_quota == max(1, int(max_24))  # never 0: that would mean "none"
    else:
        assert seeded.daily_quota == daily
