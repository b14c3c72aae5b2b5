"""Validation of submissions: pure logic, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.common.errors import InvalidArgument
from sluice.ingest.repository import TemplateRow
from sluice.ingest.validation import Policy, payload_hash, validate_submission
from sluice.v1 import intent_pb2

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
POLICY = Policy(
    default_deadline=timedelta(hours=24),
    smtputf8_kinds=frozenset({"transactional", "marketing", "digest"}),
)
TEMPLATES = {
    "welcome": TemplateRow(
        id="welcome",
        version=1,
        subject="Hi {{ name }}",
        html_body="<p>Hi {{ name }}</p>",
        text_body="Hi {{ name }}",
        variables=("name",),
        from_address="noreply@example.com",
    )
}


def submission(**overrides: object) -> intent_pb2.IntentSubmission:
    fields: dict[str, object] = {
        "idempotency_key": "k1",
        "campaign_id": "c1",
        "recipient": "alice@example.com",
        "intent": intent_pb2.INTENT_TRANSACTIONAL,
        "template_id": "welcome",
        "variables": {"name": "Alice"},
    }
    fields.update(overrides)
    return intent_pb2.IntentSubmission(**fields)  # type: ignore[arg-type]


def validate(sub: intent_pb2.IntentSubmission):  # type: ignore[no-untyped-def]
    return validate_submission(sub, TEMPLATES, now=NOW, policy=POLICY, traceparent=None)


def violations(sub: intent_pb2.IntentSubmission) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as info:
        validate(sub)
    return dict(info.value.field_violations)


def test_valid_submission_gets_defaults() -> None:
    row = validate(submission())
    assert row.kind == "transactional"
    assert row.priority == 0
    assert row.send_at == NOW
    assert row.deadline == NOW + timedelta(hours=24)
    assert row.recipient == "alice@example.com"


@pytest.mark.parametrize(
    "address",
    ["josé@exämple.com", "用户@例子.广告", "θσερ@εχαμπλε.ψομ", "user+tag@sub.example.co.uk"],
)
def test_international_addresses_are_accepted(address: str) -> None:
    # The seed's ASCII regex rejected these; email-validator accepts them.
    assert validate(submission(recipient=address)).recipient


def test_every_bad_field_is_reported_at_once() -> None:
    bad = violations(
        submission(
            idempotency_key="bad\x00key",
            recipient="not an address",
            intent=intent_pb2.INTENT_UNSPECIFIED,
            template_id="nope",
        )
    )
    assert set(bad) == {
        "intent.idempotency_key",
        "intent.recipient",
        "intent.intent",
        "intent.template_id",
    }


def test_template_variables_must_match_declaration() -> None:
    bad = violations(submission(variables={"nam": "typo"}))
    assert "intent.variables['name']" in bad
    assert "intent.variables['nam']" in bad


def test_deadline_rules() -> None:
    past = submission()
    past.deadline.FromDatetime(NOW - timedelta(minutes=1))
    assert "intent.deadline" in violations(past)
    before_send = submission()
    before_send.send_at.FromDatetime(NOW + timedelta(hours=2))
    before_send.deadline.FromDatetime(NOW + timedelta(hours=1))
    assert violations(before_send)["intent.deadline"] == "must be after send_at"


def test_field_prefix_names_the_batch_item() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_submission(
            submission(recipient="x"),
            TEMPLATES,
            now=NOW,
            policy=POLICY,
            traceparent=None,
            field_prefix="intents[7]",
        )
    assert info.value.field_violations[0][0] == "intents[7].recipient"


def test_payload_hash_ignores_nothing_the_client_sent() -> None:
    base = submission()
    assert payload_hash(base, "a@example.com") == payload_hash(submission(), "a@example.com")
    assert payload_hash(base, "a@example.com") != payload_hash(
        submission(variables={"name": "Bob"}), "a@example.com"
    )
    later = submission()
    later.send_at.FromDatetime(NOW)
    assert payload_hash(base, "a@example.com") != payload_hash(later, "a@example.com")


@settings(max_examples=200, deadline=None)
@given(
    key=st.text(max_size=300),
    recipient=st.text(max_size=80),
    name=st.text(max_size=50),
    intent=st.integers(min_value=0, max_value=5),
)
def test_any_input_is_either_a_row_or_field_violations(
    key: str, recipient: str, name: str, intent: int
) -> None:
    sub = intent_pb2.IntentSubmission(
        idempotency_key=key,
        recipient=recipient,
        intent=intent,  # type: ignore[arg-type]
        template_id="welcome",
        variables={"name": name},
    )
    try:
        row = validate(sub)
    except InvalidArgument as exc:
        found = exc.field_violations
    else:
        assert row.idempotency_key == key
        assert "@" in row.recipient
        return
    assert found
    assert all(f.startswith("intent.") for f, _ in found)
