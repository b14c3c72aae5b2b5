"""Provider payloads (already verified) to :class:`DeliveryEvent` values.

Each parser is the only place that knows its provider's event format; unknown event types
are skipped (a provider adding one must not make its webhook fail), malformed payloads raise
WebhookRejected(400) before anything is stored.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sluice.ingest.validation import normalize_recipient
from sluice.ingest.webhooks.errors import malformed
from sluice.ingest.webhooks.events import INTENT_TAG, BounceType, DeliveryEvent, EventType

_MAX_DETAIL = 500
# dot-atom local part and an ASCII host name: the addresses whose normal form is trivial
_SIMPLE = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
)


def normalise(address: object) -> str | None:
    """The address as ingest stores recipients (domain lower-cased), or None."""
    if not isinstance(address, str) or "@" not in address:
        return None
    # Bounce reports may carry a display name: "Ana <ana@example.com>".
    if "<" in address and address.rstrip().endswith(">"):
        address = address[address.rindex("<") + 1 : address.rindex(">")]
    address = address.strip()
    local, _, domain = address.rpartition("@")
    if _SIMPLE.fullmatch(address):
        # What email-validator's normalisation does to a plain ASCII address (domain
        # lower-cased, local part kept), without its cost (~80 us an address, most of the
        # parsing time of a SendGrid batch). Events matched to an intent use the intent's
        # stored recipient anyway; this form matters for unmatched ones.
        return f"{local}@{domain.lower()}"
    try:
        return normalize_recipient(address)
    except ValueError:
        return f"{local}@{domain.lower()}"


def _uuid(value: object) -> uuid.UUID | None:
    if isinstance(value, list) and value:  # SES tags are lists of values
        value = value[0]
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _time(value: object) -> datetime:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (ValueError, OverflowError, OSError):
            return datetime.now(UTC)  # out of any calendar: when we heard of it
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass  # not ISO 8601: falls through to "now"
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return datetime.now(UTC)


def _detail(value: object) -> str:
    if isinstance(value, list):
        value = "; ".join(str(v) for v in value)
    return str(value or "")[:_MAX_DETAIL]


# ---- SES (event publishing or notifications, through SNS) ---------------------------------

_SES_TYPES: dict[str, tuple[EventType, str, str]] = {
    # SES type -> (our type, payload object, recipient list in it)
    "Delivery": ("delivered", "delivery", "recipients"),
    "Bounce": ("bounced", "bounce", "bouncedRecipients"),
    "Complaint": ("complained", "complaint", "complainedRecipients"),
    "DeliveryDelay": ("deferred", "deliveryDelay", "delayedRecipients"),
    "Open": ("opened", "open", ""),
    "Click": ("clicked", "click", ""),
    "Reject": ("dropped", "reject", ""),
}


def parse_ses(sns_message_id: str, message_text: str) -> list[DeliveryEvent]:
    """Events in the ``Message`` of a verified SNS Notification from SES."""
    try:
        body = json.loads(message_text)
    except ValueError:
        raise malformed("the SNS Message is not an SES event") from None
    if not isinstance(body, dict):
        raise malformed("the SNS Message is not an SES event")
    kind = body.get("eventType") or body.get("notificationType")
    spec = _SES_TYPES.get(str(kind))
    if spec is None:
        return []
    our_type, key, recipients_key = spec
    mail = _obj(body.get("mail"))
    part = _obj(body.get(key))
    tags = _obj(mail.get("tags"))
    bounce: BounceType | None = None
    detail = ""
    if our_type == "bounced":
        bounce = "hard" if part.get("bounceType") == "Permanent" else "soft"
        detail = f"{part.get('bounceType', '')}/{part.get('bounceSubType', '')}"
    elif our_type == "complained":
        detail = str(part.get("complaintFeedbackType", ""))
    recipients: list[Any] = []
    if recipients_key:
        listed = part.get(recipients_key)
        recipients = listed if isinstance(listed, list) else []
    if not recipients:
        destination = mail.get("destination")
        recipients = destination[:1] if isinstance(destination, list) else [None]
    events = []
    for i, entry in enumerate(recipients):
        address = entry.get("emailAddress") if isinstance(entry, dict) else entry
        if isinstance(entry, dict) and entry.get("diagnosticCode"):
            detail = f"{detail} {entry['diagnosticCode']}".strip()
        events.append(
            DeliveryEvent(
                source="ses",
                event_id=sns_message_id if i == 0 else f"{sns_message_id}:{i}",
                type=our_type,
                occurred_at=_time(part.get("timestamp") or mail.get("timestamp")),
                provider_message_id=_str_or_none(mail.get("messageId")),
                intent_id=_uuid(tags.get(INTENT_TAG)),
                recipient=normalise(address),
                bounce=bounce,
                detail=_detail(detail),
                raw=body,
            )
        )
    return events


# ---- Resend (Svix) --------------------------------------------------------------------------

_RESEND_TYPES: dict[str, EventType] = {
    "email.delivered": "delivered",
    "email.bounced": "bounced",
    "email.complained": "complained",
    "email.opened": "opened",
    "email.clicked": "clicked",
    "email.delivery_delayed": "deferred",
    "email.failed": "dropped",
}


def _resend_tag(tags: object) -> object:
    if isinstance(tags, Mapping):
        return tags.get(INTENT_TAG)
    if isinstance(tags, list):
        for tag in tags:
            if isinstance(tag, Mapping) and tag.get("name") == INTENT_TAG:
                return tag.get("value")
    return None


def parse_resend(svix_id: str, body: bytes) -> list[DeliveryEvent]:
    """The event of a verified Resend webhook request."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise malformed("the Resend body is not JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
        raise malformed("the Resend body has no data object")
    our_type = _RESEND_TYPES.get(str(payload.get("type")))
    if our_type is None:
        return []
    data = payload["data"]
    bounce: BounceType | None = None
    detail = ""
    if our_type == "bounced":
        info = _obj(data.get("bounce"))
        bounce = "hard" if info.get("type") in ("Permanent", "hard") else "soft"
        detail = _detail(info.get("message") or info.get("subType") or "")
    to = data.get("to")
    recipient = to[0] if isinstance(to, list) and to else to
    return [
        DeliveryEvent(
            source="resend",
            event_id=svix_id,
            type=our_type,
            occurred_at=_time(payload.get("created_at")),
            provider_message_id=_str_or_none(data.get("email_id")),
            intent_id=_uuid(_resend_tag(data.get("tags"))),
            recipient=normalise(recipient),
            bounce=bounce,
            detail=detail,
            raw=payload,
        )
    ]


# ---- SendGrid --------------------------------------------------------------------------------

_SENDGRID_TYPES: dict[str, EventType] = {
    "delivered": "delivered",
    "bounce": "bounced",
    "spamreport": "complained",
    "open": "opened",
    "click": "clicked",
    "deferred": "deferred",
    "dropped": "dropped",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
}


def sendgrid_message_id(sg_message_id: object) -> str | None:
    """The ``X-Message-Id`` the send returned: SendGrid's per-recipient ids extend it."""
    if not isinstance(sg_message_id, str) or not sg_message_id:
        return None
    return sg_message_id.split(".", 1)[0]


def parse_sendgrid(body: bytes) -> list[DeliveryEvent]:
    """The events of a verified SendGrid Event Webhook request (a JSON array)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise malformed("the SendGrid body is not JSON") from None
    if not isinstance(payload, list):
        raise malformed("the SendGrid body is not an array of events")
    events = []
    for item in payload:
        if not isinstance(item, dict):
            raise malformed("a SendGrid event is not an object")
        our_type = _SENDGRID_TYPES.get(str(item.get("event")))
        if our_type is None:
            continue
        event_id = item.get("sg_event_id")
        if not isinstance(event_id, str) or not event_id:
            raise malformed("a SendGrid event has no sg_event_id")
        bounce: BounceType | None = None
        if our_type == "bounced":
            # "blocked" is a temporary refusal (reputation, content); "bounce" is permanent.
            bounce = "soft" if item.get("type") == "blocked" else "hard"
        events.append(
            DeliveryEvent(
                source="sendgrid",
                event_id=event_id,
                type=our_type,
                occurred_at=_time(item.get("timestamp")),
                provider_message_id=sendgrid_message_id(item.get("sg_message_id")),
                intent_id=_uuid(item.get(INTENT_TAG)),
                recipient=normalise(item.get("email")),
                bounce=bounce,
                detail=_detail(item.get("reason") or item.get("response") or ""),
                raw=item,
            )
        )
    return events


def _obj(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
