"""Reply-to, custom headers and tags of a submission: what ingest accepts, what it refuses
(with the exact field and reason), how they enter the payload hash, and that whatever it
accepts the sender's own checks accept too. Pure logic, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.common.errors import InvalidArgument
from sluice.common.headers import ALLOWED_HEADERS
from sluice.ingest.extras import MAX_HEADERS, MAX_TAGS
from sluice.ingest.repository import NewIntent
from sluice.ingest.validation import payload_hash, validate_submission
from sluice.sender.checks import MessageChecks
from sluice.v1 import intent_pb2
from tests.ingest.test_validation import NOW, POLICY, TEMPLATES, submission

# payload_hash(submission(), "alice@example.com") as computed before extras existed: an
# intent stored then must still be a duplicate of its retry, not a reused key.
HASH_BEFORE_EXTRAS = "bd979fa7ba78da32790b80af1e72321de0e1d4bd5170df430063825d5bba5103"


def validate(sub: intent_pb2.IntentSubmission, prefix: str = "intent") -> NewIntent:
    return validate_submission(
        sub, TEMPLATES, now=NOW, policy=POLICY, traceparent=None, field_prefix=prefix
    )


def refusal(sub: intent_pb2.IntentSubmission, prefix: str = "intent") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        validate(sub, prefix)
    return info.value


def test_extras_are_checked_and_carried_to_the_row() -> None:
    row = validate(
        submission(
            reply_to="Help@Bücher.de",
            headers={"X-Campaign": "spring 2026", "List-Id": "<news.example.com>"},
            tags={"cohort": "b-2", "Plan_Level": "GOLD"},
        )
    )
    assert row.reply_to == "Help@xn--bcher-kva.de"  # ASCII form: every provider carries it
    assert row.headers == {"X-Campaign": "spring 2026", "List-Id": "<news.example.com>"}
    assert row.tags == {"cohort": "b-2", "Plan_Level": "GOLD"}


def test_absent_extras_are_none_not_empty() -> None:
    row = validate(submission())
    assert (row.reply_to, row.headers, row.tags) == (None, None, None)


LONG = "v" * 2001
BAD = [
    ({"reply_to": "Help <help@example.com>"}, "intent.reply_to", "REPLY_TO_INVALID"),
    ({"reply_to": "jörg@example.com"}, "intent.reply_to", "REPLY_TO_INVALID"),
    ({"reply_to": "help@example.test"}, "intent.reply_to", "REPLY_TO_INVALID"),
    ({"reply_to": "a@b.com\r\nBcc: v@example.com"}, "intent.reply_to", "REPLY_TO_INVALID"),
    ({"reply_to": "h" * 400 + "@example.com"}, "intent.reply_to", "FIELD_TOO_LONG"),
    ({"headers": {"Bcc": "v@example.com"}}, "intent.headers['Bcc']", "HEADER_NOT_ALLOWED"),
    (
        {"headers": {"Reply-To": "x@example.com"}},
        "intent.headers['Reply-To']",
        "HEADER_NOT_ALLOWED",
    ),
    ({"headers": {"X-Original-To": "x"}}, "intent.headers['X-Original-To']", "HEADER_NOT_ALLOWED"),
    ({"headers": {"X A": "1"}}, "intent.headers['X A']", "HEADER_NOT_ALLOWED"),
    ({"headers": {"X-A\n": "1"}}, "intent.headers['X-A\\n']", "HEADER_NOT_ALLOWED"),
    ({"headers": {"X-Foo": "a\r\nBcc: v@x.com"}}, "intent.headers['X-Foo']", "CONTROL_CHARACTERS"),
    ({"headers": {"X-Foo": "a\x00"}}, "intent.headers['X-Foo']", "CONTROL_CHARACTERS"),
    ({"headers": {"X-Foo": "a\u2028b"}}, "intent.headers['X-Foo']", "CONTROL_CHARACTERS"),
    ({"headers": {"X-Foo": ""}}, "intent.headers['X-Foo']", "FIELD_REQUIRED"),
    ({"headers": {"X-Foo": LONG}}, "intent.headers['X-Foo']", "FIELD_TOO_LONG"),
    ({"headers": {"X-Foo": "=?utf-8?q?=0D=0ABcc:_v?="}}, "intent.headers['X-Foo']", "ENCODED_WORD"),
    ({"headers": {"X-Foo": "a", "x-foo": "b"}}, "intent.headers['x-foo']", "HEADER_DUPLICATE"),
    (
        {"headers": {f"X-H{i}": "1" for i in range(MAX_HEADERS + 1)}},
        "intent.headers",
        "FIELD_TOO_LONG",
    ),
    ({"headers": {f"X-H{i}": "v" * 1900 for i in range(5)}}, "intent.headers", "FIELD_TOO_LONG"),
    ({"tags": {"a b": "1"}}, "intent.tags['a b']", "TAG_INVALID"),
    ({"tags": {"cohort": "a\nb"}}, "intent.tags['cohort']", "TAG_INVALID"),
    ({"tags": {"cohort": ""}}, "intent.tags['cohort']", "TAG_INVALID"),
    ({"tags": {"cohort": "é"}}, "intent.tags['cohort']", "TAG_INVALID"),
    ({"tags": {"cohort": "x" * 257}}, "intent.tags['cohort']", "TAG_INVALID"),
    ({"tags": {"sluice_intent_id": "forged"}}, "intent.tags['sluice_intent_id']", "TAG_INVALID"),
    ({"tags": {"Sluice_x": "1"}}, "intent.tags['Sluice_x']", "TAG_INVALID"),
    ({"tags": {f"t{i}": "1" for i in range(MAX_TAGS + 1)}}, "intent.tags", "FIELD_TOO_LONG"),
]


@pytest.mark.parametrize(("overrides", "field", "reason"), BAD)
def test_each_bad_extra_names_its_field_and_reason(
    overrides: dict[str, object], field: str, reason: str
) -> None:
    exc = refusal(submission(**overrides))
    assert [f for f, _ in exc.field_violations] == [field]
    assert exc.reason == reason
    assert exc.code.name == "INVALID_ARGUMENT"


def test_a_batch_item_is_named_by_its_index() -> None:
    exc = refusal(submission(headers={"X-Foo": "1\r\n"}, tags={"k": "v v"}), "intents[3]")
    assert [f for f, _ in exc.field_violations] == [
        "intents[3].headers['X-Foo']",
        "intents[3].tags['k']",
    ]


def test_every_allow_listed_header_passes_in_any_case() -> None:
    names = {h.upper() for h in ALLOWED_HEADERS} | {"X-Anything-1", "x-mailer"}
    for name in names:
        assert validate(submission(headers={name: "1"})).headers == {name: "1"}


def test_extras_enter_the_payload_hash_and_absent_ones_change_nothing() -> None:
    base = validate(submission()).payload_hash
    assert base.hex() == HASH_BEFORE_EXTRAS
    variants = [
        submission(reply_to="help@example.com"),
        submission(reply_to="other@example.com"),
        submission(headers={"X-A": "1"}),
        submission(headers={"X-A": "2"}),
        submission(headers={"X-B": "1"}),
        submission(tags={"a": "1"}),
        submission(tags={"a": "2"}),
        # The same pair as a header and as a tag must not hash alike.
        submission(tags={"X-A": "1"}),
    ]
    hashes = {validate(sub).payload_hash for sub in variants}
    assert len(hashes) == len(variants)
    assert base not in hashes
    # Called on a submission alone, the hash reads the extras from it as submitted.
    sub = submission(reply_to="help@example.com", headers={"X-A": "1"}, tags={"a": "1"})
    assert payload_hash(sub, "alice@example.com") == validate(sub).payload_hash
    # A retry hashes the same; reply_to is compared in its stored form.
    assert (
        validate(submission(reply_to="Help@EXAMPLE.com")).payload_hash
        == validate(submission(reply_to="Help@example.com")).payload_hash
    )


header_names = st.sampled_from(sorted(ALLOWED_HEADERS)) | st.text(max_size=12).map("X-".__add__)
header_names |= st.text(max_size=12)
any_text = st.text(max_size=30) | st.sampled_from(["=?utf-8?q?x?=", "a\r\nb", "\x00", "ok"])
tag_text = st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True) | st.text(max_size=8)
addresses = st.sampled_from(["help@example.com", "Ana <a@example.com>", "jörg@bücher.de"])


@settings(max_examples=300, deadline=None)
@given(
    reply_to=addresses | st.text(max_size=30),
    headers=st.dictionaries(header_names, any_text, max_size=4),
    tags=st.dictionaries(tag_text, tag_text, max_size=4),
)
def test_whatever_ingest_accepts_the_sender_sends(
    reply_to: str, headers: dict[str, str], tags: dict[str, str]
) -> None:
    """One definition: no stored intent may be refused by the sender for its extras."""
    sub = submission(reply_to=reply_to, headers=headers, tags=tags)
    try:
        row = validate(sub)
    except InvalidArgument as exc:
        fields = [f for f, _ in exc.field_violations]
        assert fields
        assert all(
            f.startswith(("intent.reply_to", "intent.headers", "intent.tags")) for f in fields
        )
        return
    MessageChecks().check(
        intent_id=str(row.id),
        idempotency_key=str(row.id),
        recipient=row.recipient,
        from_address="noreply@example.com",
        subject="Hi",
        reply_to=row.reply_to or "",
        headers=(row.headers or {}).items(),
        tags=(row.tags or {}).items(),
    )
