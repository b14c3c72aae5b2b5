"""Validation of intent submissions: everything ingest checks before a row is written.

A submission either becomes a :class:`~sluice.ingest.repository.NewIntent` or raises
:class:`~sluice.common.errors.InvalidArgument` listing every bad field at once, each with a
stable reason (how errors are collected and quoted: :mod:`sluice.ingest.violations`).
Reply-to, custom headers and tags are checked by :mod:`sluice.ingest.extras`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jinja2
import jinja2.meta
from google.protobuf import timestamp_pb2

from sluice.common.addresses import RecipientError, check_recipient
from sluice.common.model import PRIORITY, PROTO_TO_KIND
from sluice.ingest import schedule
from sluice.ingest.extras import NO_EXTRAS, Extras, check_extras
from sluice.ingest.repository import NewIntent, TemplateRow
from sluice.ingest.violations import (
    R_CONTROL,
    R_RECIPIENT,
    R_REQUIRED,
    R_SMTPUTF8,
    R_TEMPLATE,
    R_TIME,
    R_TOO_LONG,
    R_VARIABLES,
    UNSAFE_LINE,
    Violations,
    quote,
)
from sluice.v1 import intent_pb2

MAX_KEY_LENGTH = 256
MAX_CAMPAIGN_LENGTH = 128
MAX_RUN_LENGTH = 64
MAX_TEMPLATE_ID_LENGTH = 128
MAX_RECIPIENT_LENGTH = 320  # far above the 254 SMTP allows; longer is refused unparsed
MAX_VARIABLES = 64
MAX_VARIABLE_NAME = 64
MAX_VARIABLE_VALUE = 16 * 1024
MAX_VARIABLES_TOTAL = 64 * 1024
#: Keys Sluice derives start with this; a client key may not, so the two never collide.
DERIVED_KEY_PREFIX = "sluice:"

# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_AHEAD = 366 * 86_400  # the furthest ahead a send-at may be, in seconds


@dataclass(frozen=True, slots=True)
class Policy:
    """What validation needs from configuration.

    ``smtputf8_kinds``: intent kinds for which some configured provider can take an address
    that needs SMTPUTF8; such an address of another kind is refused at ingest.
    """

    default_deadline: timedelta | Mapping[str, timedelta]
    smtputf8_kinds: frozenset[str]
    check_deliverability: bool = False


def normalize_recipient(address: str) -> str:
    """The normalised form of an address (strict, as submissions are checked), or
    ValueError (a RecipientError) saying why it is refused."""
    return check_recipient(address).address


def check_text(field: str, value: str, limit: int) -> None:
    """Raises InvalidArgument unless ``value`` is a single-line identifier of at most
    ``limit`` characters (for request fields outside a submission, e.g. filters)."""
    v = Violations("")
    v.text(field, value, limit)
    if v.items:
        raise v.error()


def check_time(field: str, message: object) -> datetime:
    """The UTC time of ``message``'s Timestamp ``field``, or InvalidArgument when it lies
    outside years 1-9999 or its nanos are out of range (for request fields outside a
    submission, e.g. list filters)."""
    v = Violations("")
    value = _timestamp(getattr(message, field), field, v)
    if value is None:
        raise v.error()
    return value


def payload_hash(
    sub: intent_pb2.IntentSubmission,
    recipient: str,
    variables: Mapping[str, str] | None = None,
    extras: Extras | None = None,
) -> bytes:
    """A digest of what the client asked for, to tell a retry from a different request
    that reuses the key. It covers the fields as submitted (an unset send-at stays unset),
    so a retry minutes later hashes the same. Parts are joined with NUL, which validation
    refuses in every field, so no two different submissions share an encoding (and it
    costs a fraction of a JSON dump). Only called on a submission that passed validation.

    ``extras`` (reply-to, headers, tags; None: as in ``sub``) follow the variables, each
    behind a marker starting with ":", which no variable, header or tag name can contain.
    Absent extras add nothing, so intents stored before they existed hash as they did."""
    parts = [
        sub.campaign_id,
        recipient,
        str(int(sub.intent)),
        sub.template_id,
        sub.run,
        sub.send_at.ToJsonString() if sub.HasField("send_at") else "-",
        sub.deadline.ToJsonString() if sub.HasField("deadline") else "-",
    ]
    if sub.HasField("send_at_local"):
        parts.append(f"local:{sub.send_at_local.date_time}@{sub.send_at_local.time_zone}")
    for name, value in sorted((sub.variables if variables is None else variables).items()):
        parts.append(name)
        parts.append(value)
    if extras is None:
        extras = Extras(sub.reply_to or None, dict(sub.headers) or None, dict(sub.tags) or None)
    if extras is not NO_EXTRAS:
        if extras.reply_to:
            parts.extend((":reply_to", extras.reply_to))
        for marker, pairs in ((":headers", extras.headers), (":tags", extras.tags)):
            if pairs:
                parts.append(marker)
                for name, value in sorted(pairs.items()):
                    parts.append(name)
                    parts.append(value)
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).digest()


def derived_key(campaign_id: str, run: str, recipient: str, template_id: str) -> str:
    """The idempotency key of a submission that gave none (README, "Idempotency")."""
    parts = json.dumps([campaign_id, run, recipient, template_id], ensure_ascii=False)
    return DERIVED_KEY_PREFIX + hashlib.sha256(parts.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1024)
def header_variables(template_id: str, version: int, subject: str) -> frozenset[str] | None:
    """The variables a template's subject uses (None: the subject does not parse, so every
    variable is treated as one the subject uses)."""
    try:
        return frozenset(
            jinja2.meta.find_undeclared_variables(
                jinja2.Environment(autoescape=True).parse(subject)
            )
        )
    except jinja2.TemplateError:
        return None


def _timestamp(ts: timestamp_pb2.Timestamp, field: str, v: Violations) -> datetime | None:
    if not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS or not 0 <= ts.nanos <= 999_999_999:
        v.add(field, "must be a timestamp in years 1-9999 with nanos in 0..999999999", R_TIME)
        return None
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def validate_submission(
    sub: intent_pb2.IntentSubmission,
    templates: Mapping[str, TemplateRow],
    *,
    now: datetime,
    policy: Policy,
    traceparent: str | None,
    field_prefix: str = "intent",
) -> NewIntent:
    """Checks one submission and returns the row to insert, or raises InvalidArgument."""
    v = Violations(field_prefix)

    key = sub.idempotency_key
    v.text("idempotency_key", key, MAX_KEY_LENGTH)
    if key.startswith(DERIVED_KEY_PREFIX):
        v.add("idempotency_key", f"must not start with {DERIVED_KEY_PREFIX!r} (reserved)")
    elif not key and not sub.campaign_id:
        v.add(
            "idempotency_key",
            "required unless campaign_id is given (the key is then derived from"
            " campaign_id, run, recipient and template_id)",
            R_REQUIRED,
        )
    v.text("campaign_id", sub.campaign_id, MAX_CAMPAIGN_LENGTH)
    v.text("run", sub.run, MAX_RUN_LENGTH)

    recipient = ""
    smtputf8 = False
    if not sub.recipient:
        v.add("recipient", "required", R_REQUIRED)
    elif len(sub.recipient) > MAX_RECIPIENT_LENGTH:
        v.add("recipient", f"at most {MAX_RECIPIENT_LENGTH} characters", R_TOO_LONG)
    else:
        try:
            checked = check_recipient(
                sub.recipient, check_deliverability=policy.check_deliverability
            )
        except RecipientError as exc:
            v.add("recipient", str(exc)[:200], R_RECIPIENT)
        else:
            recipient, smtputf8 = checked.address, checked.smtputf8

    kind = PROTO_TO_KIND.get(int(sub.intent))
    if kind is None:
        v.add(
            "intent",
            "required: INTENT_TRANSACTIONAL, INTENT_MARKETING or INTENT_DIGEST",
            R_REQUIRED,
        )
    elif smtputf8 and kind not in policy.smtputf8_kinds:
        v.add(
            "recipient",
            f"needs SMTPUTF8, and no configured provider of {kind} mail can take it",
            R_SMTPUTF8,
        )

    template: TemplateRow | None = None
    before = len(v.items)
    v.text("template_id", sub.template_id, MAX_TEMPLATE_ID_LENGTH, required=True)
    if len(v.items) == before:
        template = templates.get(sub.template_id)
        if template is None:
            v.add("template_id", f"template {quote(sub.template_id)} does not exist", R_TEMPLATE)

    # One conversion: the protobuf map's Python view is several times slower to iterate.
    variables = dict(sub.variables)
    _check_variables(variables, template, v)
    extras = check_extras(sub, v) if sub.reply_to or sub.headers or sub.tags else NO_EXTRAS

    # Out-of-range timestamps first: converting them would overflow (INTERNAL before).
    times_ok = True
    for name in ("send_at", "deadline"):
        if sub.HasField(name) and _timestamp(getattr(sub, name), name, v) is None:
            times_ok = False
    # A send-at near year 9999 would overflow the default deadline computed from it.
    if times_ok and sub.HasField("send_at") and sub.send_at.seconds > now.timestamp() + _AHEAD:
        v.add("send_at", "at most 366 days ahead", R_TIME)
        times_ok = False
    send_at, deadline = now, now
    if times_ok:
        send_at, deadline = schedule.resolve(
            sub,
            kind,
            now=now,
            windows=policy.default_deadline,
            bad=lambda f, d: v.add(f, d[:200], R_TIME),
        )

    if v.items:
        raise v.error()
    assert kind is not None
    row = NewIntent(
        id=uuid.uuid4(),
        idempotency_key=key or derived_key(sub.campaign_id, sub.run, recipient, sub.template_id),
        payload_hash=payload_hash(sub, recipient, variables, extras),
        campaign_id=sub.campaign_id,
        recipient=recipient,
        kind=kind,
        priority=PRIORITY[kind],
        template_id=sub.template_id,
        variables=variables,
        send_at=send_at,
        deadline=deadline,
        traceparent=traceparent or None,
        run=sub.run,
        smtputf8=smtputf8,
    )
    # Set only when given: three more keyword arguments cost every intent (~2% of this
    # function, measured), and most intents carry no extras.
    if extras is not NO_EXTRAS:
        row.reply_to, row.headers, row.tags = extras.reply_to, extras.headers, extras.tags
    return row


def _check_variables(
    variables: dict[str, str], template: TemplateRow | None, v: Violations
) -> None:
    if len(variables) > MAX_VARIABLES:
        v.add("variables", f"at most {MAX_VARIABLES} variables, got {len(variables)}", R_TOO_LONG)
        return
    in_header: frozenset[str] | None = frozenset()
    if template is not None:
        in_header = header_variables(template.id, template.version, template.subject)
    total = 0
    for name, value in variables.items():
        total += len(name) + len(value)
        field = f"variables[{quote(name)}]"
        if not name or len(name) > MAX_VARIABLE_NAME or not name.isidentifier():
            v.add(field, f"names are identifiers of at most {MAX_VARIABLE_NAME} characters")
        elif len(value) > MAX_VARIABLE_VALUE:
            v.add(field, f"at most {MAX_VARIABLE_VALUE} characters, got {len(value)}", R_TOO_LONG)
        elif "\x00" in value:
            v.add(field, "must not contain NUL characters", R_CONTROL)
        elif (in_header is None or name in in_header) and UNSAFE_LINE.search(value):
            v.add(
                field,
                "used by the subject, so it must be one line with no control characters",
                R_CONTROL,
            )
    if total > MAX_VARIABLES_TOTAL:
        v.add("variables", f"at most {MAX_VARIABLES_TOTAL} characters in all", R_TOO_LONG)
    if template is None:
        return
    declared = set(template.variables)
    if declared == variables.keys():
        return
    for name in sorted(declared - variables.keys()):
        v.add(
            f"variables[{quote(name)}]", f"required by template {quote(template.id)}", R_VARIABLES
        )
    for name in sorted(variables.keys() - declared):
        v.add(
            f"variables[{quote(name)}]",
            f"not declared by template {quote(template.id)}",
            R_VARIABLES,
        )
