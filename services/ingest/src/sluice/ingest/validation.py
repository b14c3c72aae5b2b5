"""Validation of intent submissions: everything ingest checks before a row is written.

A submission either becomes a :class:`~sluice.ingest.repository.NewIntent` or raises
:class:`~sluice.common.errors.InvalidArgument` listing every bad field at once, so a client
fixes its request in one round trip.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from email_validator import EmailNotValidError, validate_email

from sluice.common.errors import InvalidArgument
from sluice.common.model import PRIORITY, PROTO_TO_KIND
from sluice.ingest import schedule
from sluice.ingest.repository import NewIntent, TemplateRow
from sluice.v1 import intent_pb2

MAX_KEY_LENGTH = 256
MAX_CAMPAIGN_LENGTH = 128
MAX_VARIABLES = 64
MAX_VARIABLE_NAME = 64
MAX_VARIABLE_VALUE = 16 * 1024
MAX_VARIABLES_TOTAL = 64 * 1024


def normalize_recipient(address: str) -> str:
    """The normalized form of a deliverable-looking address (internationalised allowed).

    Raises ValueError with email-validator's explanation. DNS is not consulted: ingest must
    not block on the network, and providers report undeliverable domains as bounces.
    """
    try:
        result = validate_email(address, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from exc
    return str(result.normalized)


def payload_hash(sub: intent_pb2.IntentSubmission, recipient: str) -> bytes:
    """A digest of what the client asked for, to tell a retry from a different request
    that reuses the key. It covers the fields as submitted (an unset send-at stays unset),
    so a retry minutes later hashes the same."""
    canonical = {
        "campaign_id": sub.campaign_id,
        "recipient": recipient,
        "intent": int(sub.intent),
        "template_id": sub.template_id,
        "variables": sorted(sub.variables.items()),
        "send_at": sub.send_at.ToJsonString() if sub.HasField("send_at") else None,
        "deadline": sub.deadline.ToJsonString() if sub.HasField("deadline") else None,
    }
    if sub.HasField("send_at_local"):
        # only when set, so the hashes of intents stored before the field existed still match
        canonical["send_at_local"] = [sub.send_at_local.date_time, sub.send_at_local.time_zone]
    encoded = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode("utf-8")).digest()


def validate_submission(
    sub: intent_pb2.IntentSubmission,
    templates: Mapping[str, TemplateRow],
    *,
    now: datetime,
    default_deadline: timedelta | Mapping[str, timedelta],
    traceparent: str | None,
    field_prefix: str = "intent",
) -> NewIntent:
    """Checks one submission and returns the row to insert, or raises InvalidArgument."""
    violations: list[tuple[str, str]] = []

    def bad(field: str, description: str) -> None:
        violations.append((f"{field_prefix}.{field}", description))

    key = sub.idempotency_key
    if not key:
        bad("idempotency_key", "required: the same key always names the same intent")
    elif len(key) > MAX_KEY_LENGTH:
        bad("idempotency_key", f"at most {MAX_KEY_LENGTH} characters")
    elif not key.isprintable():
        bad("idempotency_key", "must be printable text")

    if len(sub.campaign_id) > MAX_CAMPAIGN_LENGTH:
        bad("campaign_id", f"at most {MAX_CAMPAIGN_LENGTH} characters")

    recipient = ""
    if not sub.recipient:
        bad("recipient", "required")
    else:
        try:
            recipient = normalize_recipient(sub.recipient)
        except ValueError as exc:
            bad("recipient", str(exc))

    kind = PROTO_TO_KIND.get(int(sub.intent))
    if kind is None:
        bad("intent", "required: INTENT_TRANSACTIONAL, INTENT_MARKETING or INTENT_DIGEST")

    template = templates.get(sub.template_id) if sub.template_id else None
    if not sub.template_id:
        bad("template_id", "required")
    elif template is None:
        bad("template_id", f"template {sub.template_id!r} does not exist")

    _check_variables(sub, template, bad)

    send_at, deadline = schedule.resolve(sub, kind, now=now, windows=default_deadline, bad=bad)

    if violations:
        raise InvalidArgument(
            f"{len(violations)} invalid field{'s' if len(violations) > 1 else ''}: "
            + "; ".join(f"{f}: {d}" for f, d in violations),
            violations,
        )
    assert kind is not None
    return NewIntent(
        id=uuid.uuid4(),
        idempotency_key=key,
        payload_hash=payload_hash(sub, recipient),
        campaign_id=sub.campaign_id,
        recipient=recipient,
        kind=kind,
        priority=PRIORITY[kind],
        template_id=sub.template_id,
        variables=dict(sub.variables),
        send_at=send_at,
        deadline=deadline,
        traceparent=traceparent or None,
    )


def _check_variables(
    sub: intent_pb2.IntentSubmission,
    template: TemplateRow | None,
    bad: Callable[[str, str], None],
) -> None:
    variables = sub.variables
    if len(variables) > MAX_VARIABLES:
        bad("variables", f"at most {MAX_VARIABLES} variables")
        return
    total = 0
    for name, value in variables.items():
        total += len(name) + len(value)
        if not name or len(name) > MAX_VARIABLE_NAME or not name.isidentifier():
            bad(f"variables[{name!r}]", "names are identifiers of at most 64 characters")
        elif len(value) > MAX_VARIABLE_VALUE:
            bad(f"variables[{name!r}]", f"at most {MAX_VARIABLE_VALUE} characters")
    if total > MAX_VARIABLES_TOTAL:
        bad("variables", f"at most {MAX_VARIABLES_TOTAL} characters in all")
    if template is None:
        return
    declared = set(template.variables)
    for name in sorted(declared - variables.keys()):
        bad(f"variables[{name!r}]", f"required by template {template.id!r}")
    for name in sorted(variables.keys() - declared):
        bad(f"variables[{name!r}]", f"not declared by template {template.id!r}")
