"""The fast path of validation: the row of a submission with nothing unusual about it.

:func:`sluice.ingest.validation.validate_submission` is the authority: it checks every
field, collects every violation and words the errors. Most submissions of a batch break no
rule, and for those that work is overhead: about half of a batch's CPU went to validating
items that were fine. :func:`plain_row` takes only the common shape (no send-at, local
send-at or deadline; no reply-to, headers or tags; a template that exists, with exactly
its declared variables; printable identifiers within their lengths; a recipient that
checks) and builds the same row the full check would, with the checks as plain boolean
tests. Anything else, and every submission that breaks a rule, gets None and goes through
the full check, which then says what is wrong; so the fast path can only decline, never
decide differently. ``tests/ingest/test_plain.py`` proves with hypothesis and a sweep of
one odd field at a time that whenever it returns a row, the full check returns the same.

One fact it leans on: every character the full check's control-character pattern
(``UNSAFE_LINE``) matches is also not printable, so ``str.isprintable`` alone decides the
identifier fields (checked over all of Unicode by the same test module).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from uuid import UUID

from sluice.common.addresses import RecipientError, check_recipient
from sluice.common.model import PRIORITY, PROTO_TO_KIND
from sluice.ingest.extras import NO_EXTRAS
from sluice.ingest.repository import NewIntent, TemplateRow
from sluice.ingest.schedule import deadline_window
from sluice.ingest.validation import (
    DERIVED_KEY_PREFIX,
    MAX_CAMPAIGN_LENGTH,
    MAX_KEY_LENGTH,
    MAX_RECIPIENT_LENGTH,
    MAX_RUN_LENGTH,
    MAX_TEMPLATE_ID_LENGTH,
    MAX_VARIABLE_NAME,
    MAX_VARIABLE_VALUE,
    MAX_VARIABLES,
    MAX_VARIABLES_TOTAL,
    Policy,
    derived_key,
    header_variables,
    payload_hash,
)
from sluice.ingest.violations import UNSAFE_LINE
from sluice.v1 import intent_pb2


def plain_row(
    sub: intent_pb2.IntentSubmission,
    templates: Mapping[str, TemplateRow],
    *,
    now: datetime,
    policy: Policy,
    traceparent: str | None,
    intent_id: UUID,
) -> NewIntent | None:
    """The row :func:`~sluice.ingest.validation.validate_submission` would return for
    ``sub``, or None when ``sub`` is not of the common shape (or breaks a rule)."""
    if sub.HasField("send_at") or sub.HasField("send_at_local") or sub.HasField("deadline"):
        return None
    if sub.reply_to or sub.headers or sub.tags:  # extras: sluice.ingest.extras checks them
        return None
    key, campaign, run = sub.idempotency_key, sub.campaign_id, sub.run
    template_id, address = sub.template_id, sub.recipient
    if (
        len(key) > MAX_KEY_LENGTH
        or len(campaign) > MAX_CAMPAIGN_LENGTH
        or len(run) > MAX_RUN_LENGTH
        or not 0 < len(template_id) <= MAX_TEMPLATE_ID_LENGTH
        or not 0 < len(address) <= MAX_RECIPIENT_LENGTH
        or not (key or campaign)
        or key.startswith(DERIVED_KEY_PREFIX)
        # One call for four fields: a string is printable when each of its characters is.
        or not (key + campaign + run + template_id).isprintable()
    ):
        return None
    kind = PROTO_TO_KIND.get(int(sub.intent))
    template = templates.get(template_id)
    if kind is None or template is None:
        return None
    variables = dict(sub.variables)
    if not _variables_fit(variables, template):
        return None
    try:
        checked = check_recipient(address, check_deliverability=policy.check_deliverability)
    except RecipientError:
        return None
    if checked.smtputf8 and kind not in policy.smtputf8_kinds:
        return None
    recipient = checked.address
    return NewIntent(
        id=intent_id,
        idempotency_key=key or derived_key(campaign, run, recipient, template_id),
        payload_hash=payload_hash(sub, recipient, variables, NO_EXTRAS),
        campaign_id=campaign,
        recipient=recipient,
        kind=kind,
        priority=PRIORITY[kind],
        template_id=template_id,
        variables=variables,
        send_at=now,
        deadline=now + deadline_window(policy.default_deadline, kind),
        traceparent=traceparent or None,
        run=run,
        smtputf8=checked.smtputf8,
    )


def _variables_fit(variables: dict[str, str], template: TemplateRow) -> bool:
    """Exactly the template's variables, each within the full check's rules."""
    if len(variables) > MAX_VARIABLES or variables.keys() != set(template.variables):
        return False
    in_header = header_variables(template.id, template.version, template.subject)
    total = 0
    for name, value in variables.items():
        total += len(name) + len(value)
        if (
            len(name) > MAX_VARIABLE_NAME
            or not name.isidentifier()
            or len(value) > MAX_VARIABLE_VALUE
            or "\x00" in value
            or ((in_header is None or name in in_header) and UNSAFE_LINE.search(value))
        ):
            return False
    return total <= MAX_VARIABLES_TOTAL
