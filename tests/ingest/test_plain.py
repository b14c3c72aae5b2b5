"""Validation's fast path (sluice.ingest.plain) decides exactly as the full check does."""

from __future__ import annotations

import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.common.errors import InvalidArgument
from sluice.ingest.plain import plain_row
from sluice.ingest.repository import NewIntent, TemplateRow
from sluice.ingest.validation import Policy, validate_submission
from sluice.ingest.violations import UNSAFE_LINE
from sluice.v1 import intent_pb2

T = TypeVar("T")
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
ID = uuid.UUID("6f1c2f0e-8f8e-4f5c-9a7b-2c1d3e4f5a6b")


def _template(template_id: str, subject: str, variables: tuple[str, ...]) -> TemplateRow:
    return TemplateRow(
        id=template_id,
        version=1,
        subject=subject,
        html_body="<p>body</p>",
        text_body="body",
        variables=variables,
        from_address="noreply@example.com",
    )


TEMPLATES = {
    t.id: t
    for t in (
        _template("welcome", "Hi {{ name }}", ("name", "footer")),
        _template("plain", "Hello", ("name",)),
        _template("none", "Hello", ()),
        _template("broken", "Hi {{ name", ("name",)),  # subject does not parse
        _template("dup", "Hi", ("name", "name")),  # a declaration naming a variable twice
        _template("many", "Hi", tuple(f"v{i}" for i in range(70))),
        _template("five", "Hi", ("a", "b", "c", "d", "e")),  # 5 x 16,000 is over 64 KiB
        _template("dashed", "Hi", ("my-name",)),  # declares a name no submission may use
        _template("long-name", "Hi", ("n" * 65,)),  # ... and one too long
    )
}
POLICIES = [
    Policy(default_deadline=timedelta(hours=24), smtputf8_kinds=frozenset()),
    Policy(
        default_deadline={"transactional": timedelta(hours=1), "marketing": timedelta(days=3)},
        smtputf8_kinds=frozenset({"transactional", "marketing", "digest"}),
    ),
]

_TRICKY = "\x00\r\n\t\x7f\x85\u2028\u200f\u202e\u2066 é用"
_text = st.text(
    st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(_TRICKY)), max_size=12
)
_name = st.one_of(st.sampled_from(["name", "footer", "nam", "", "9x", "v1"]), _text)
_value = st.one_of(
    _text,
    st.sampled_from(["Alice", "a\r\nb", "x\x00y", "tab\there", "z" * 16_385, "é" * 40]),
)
_RECIPIENTS = [
    "alice@example.com",
    "Alice@EXAMPLE.com",
    "josé@exämple.com",
    "user@münchen.de",
    "alice@localhost",
    "not an address",
    '"q"@example.com',
    "a" * 65 + "@example.com",
    "b@" + "c" * 330 + ".com",
    "",
]
_odd_keys = st.one_of(st.sampled_from(["sluice:k", "k" * 257, "k\x00", "k\u202e"]), _text)
_odd_campaigns = st.one_of(st.sampled_from(["", "c" * 129, "c\n"]), _text)
_odd_runs = st.one_of(st.sampled_from(["r" * 65, "r\u2028"]), _text)
_odd_recipients = st.one_of(st.sampled_from(_RECIPIENTS[4:]), _text)
_odd_template_ids = st.one_of(st.sampled_from(["nope", "", "we\x00lcome", "t" * 129]), _text)
_seconds = st.one_of(
    st.integers(-(2**40), 2**40),
    st.integers(int(NOW.timestamp()) - 200_000, int(NOW.timestamp()) + 40_000_000),
)


@st.composite
def _odd_variables(draw: st.DrawFn, declared: tuple[str, ...]) -> dict[str, str]:
    """The declared variables with one thing wrong (or not: some odd values are fine)."""
    variables = dict.fromkeys(declared, "Ana")
    change = draw(st.sampled_from(["add", "drop", "value", "long", "random"]))
    if change == "add":
        variables[draw(_name)] = draw(_value)
    elif change == "drop" and variables:
        del variables[draw(st.sampled_from(sorted(variables)))]
    elif change == "value" and variables:
        variables[draw(st.sampled_from(sorted(variables)))] = draw(_value)
    elif change == "long":
        variables = {name: "v" * (40_000 // max(1, len(declared))) for name in declared}
        variables.update(draw(st.sampled_from([{}, {"extra": "e" * 30_000}])))
    else:
        variables = draw(st.dictionaries(_name, _value, max_size=3))
    return variables


def _either(draw: st.DrawFn, usual: st.SearchStrategy[T], odd: st.SearchStrategy[T]) -> T:
    # Mostly the usual value: a submission is then valid or broken in one or two places,
    # the boundary where a fast path goes wrong (fully random ones are all refused).
    return draw(odd if draw(st.integers(0, 6)) == 0 else usual)


@st.composite
def submissions(draw: st.DrawFn) -> intent_pb2.IntentSubmission:
    template = _either(draw, st.sampled_from(list(TEMPLATES)), _odd_template_ids)
    declared = TEMPLATES[template].variables if template in TEMPLATES else ("name",)
    sub = intent_pb2.IntentSubmission(
        idempotency_key=_either(draw, st.sampled_from(["k1", "", "k" * 256]), _odd_keys),
        campaign_id=_either(draw, st.just("spring"), _odd_campaigns),
        run=_either(draw, st.sampled_from(["", "2026-W48"]), _odd_runs),
        recipient=_either(draw, st.sampled_from(_RECIPIENTS[:4]), _odd_recipients),
        intent=_either(draw, st.integers(1, 3), st.sampled_from([0, 4])),  # type: ignore[arg-type]
        template_id=template,
        variables=_either(draw, st.just(dict.fromkeys(declared, "Ana")), _odd_variables(declared)),
    )
    for field in ("send_at", "deadline"):
        if draw(st.integers(0, 6)) == 0:
            getattr(sub, field).seconds = draw(_seconds)
            getattr(sub, field).nanos = draw(st.sampled_from([0, 5, 10**9]))
    if draw(st.integers(0, 6)) == 0:
        sub.send_at_local.date_time = draw(st.sampled_from(["2026-12-01T09:00:00", "soon"]))
        sub.send_at_local.time_zone = draw(st.sampled_from(["Europe/Berlin", "", "Mars/Base"]))
    return sub


def _full(sub: intent_pb2.IntentSubmission, policy: Policy) -> NewIntent | None:
    try:
        return validate_submission(
            sub, TEMPLATES, now=NOW, policy=policy, traceparent="00-t", intent_id=ID
        )
    except InvalidArgument:
        return None


def _fast(sub: intent_pb2.IntentSubmission, policy: Policy) -> NewIntent | None:
    return plain_row(sub, TEMPLATES, now=NOW, policy=policy, traceparent="00-t", intent_id=ID)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sub=submissions(), policy=st.sampled_from(POLICIES))
def test_the_fast_path_returns_the_full_checks_row_or_declines(
    sub: intent_pb2.IntentSubmission, policy: Policy
) -> None:
    fast = _fast(sub, policy)
    if fast is not None:
        assert _full(sub, policy) == fast


@settings(max_examples=500, deadline=None)
@given(
    key=st.sampled_from(["", "k-1", "k" * 256]),
    campaign=st.sampled_from(["", "spring"]),
    recipient=st.sampled_from(_RECIPIENTS[:4]),
    intent=st.integers(1, 3),
    template=st.sampled_from(["welcome", "plain", "none"]),
    policy=st.sampled_from(POLICIES),
)
def test_plain_submissions_take_the_fast_path_to_the_same_row(
    key: str, campaign: str, recipient: str, intent: int, template: str, policy: Policy
) -> None:
    # The common shape, valid or not: the fast path must take every valid one (or it would
    # not be a fast path) and agree with the full check on it.
    sub = intent_pb2.IntentSubmission(
        idempotency_key=key,
        campaign_id=campaign,
        recipient=recipient,
        intent=intent,  # type: ignore[arg-type]
        template_id=template,
        variables=dict.fromkeys(TEMPLATES[template].variables, "x"),
    )
    full = _full(sub, policy)
    assert _fast(sub, policy) == full


def _odd_values() -> list[tuple[str, object]]:
    """(field, value) pairs, each breaking (or nearly breaking) one rule of the full check."""
    odd: list[tuple[str, object]] = [
        ("idempotency_key", k) for k in ["sluice:k", "k" * 257, "k\x00", "k\u202e", "k\n", ""]
    ]
    odd += [("campaign_id", c) for c in ["", "c" * 129, "c" * 128, "c\r", "\u2066c"]]
    odd += [("run", r) for r in ["r" * 65, "r" * 64, "r\u2028", "é"]]
    odd += [("recipient", r) for r in _RECIPIENTS]
    odd += [("intent", i) for i in [0, 4, 99]]
    odd += [("template_id", t) for t in ["nope", "", "we\x00lcome", "t" * 129, *TEMPLATES]]
    odd += [("value", v) for v in ["a\r\nb", "x\x00y", "tab\there", "z" * 16_385, "\u202e"]]
    odd += [("extra", n) for n in ["name", "footer", "", "9x", "n" * 65, "v1", "é"]]
    odd += [("drop", None), ("long", 33_000), ("long", 16_384), ("long", 16_000)]
    odd += [("reply_to", "help@example.com"), ("reply_to", "nope"), ("header", "X-Campaign")]
    odd += [("header", "Bcc"), ("tag", "batch"), ("tag", "sluice_x")]
    return odd


def _apply(sub: intent_pb2.IntentSubmission, field: str, value: object) -> None:
    names = sorted(sub.variables)
    if field == "value" and names:
        sub.variables[names[0]] = str(value)
    elif field == "extra":
        sub.variables[str(value)] = "Ana"
    elif field == "drop" and names:
        del sub.variables[names[0]]
    elif field == "header":
        sub.headers[str(value)] = "1"
    elif field == "tag":
        sub.tags[str(value)] = "v1"
    elif field == "long":
        for name in names:
            sub.variables[name] = "v" * int(str(value))
    elif field not in ("value", "drop"):
        setattr(sub, field, value)


def test_one_odd_field_at_a_time_the_fast_path_agrees_or_declines() -> None:
    # Every template and policy with each odd value in turn: a deterministic sweep of the
    # boundaries the random test above may take many examples to find.
    checked = 0
    for template in TEMPLATES.values():
        for policy in POLICIES:
            for field, value in _odd_values():
                sub = intent_pb2.IntentSubmission(
                    idempotency_key="k1",
                    campaign_id="spring",
                    recipient="alice@example.com",
                    intent=intent_pb2.INTENT_MARKETING,
                    template_id=template.id,
                    variables=dict.fromkeys(template.variables, "Ana"),
                )
                _apply(sub, field, value)
                fast, full = _fast(sub, policy), _full(sub, policy)
                assert fast is None or fast == full, (template.id, field, value)
                checked += fast is not None
    assert checked > 100  # the sweep reaches the fast path, not only its refusals


def test_every_character_the_control_pattern_matches_is_unprintable() -> None:
    # What lets the fast path decide identifiers with str.isprintable alone.
    matched = [c for c in map(chr, range(sys.maxunicode + 1)) if UNSAFE_LINE.match(c)]
    assert len(matched) > 60
    assert not any(c.isprintable() for c in matched)
