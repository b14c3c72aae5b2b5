"""Provider payloads in each provider's documented shape."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from sluice.ingest.webhooks.events import INTENT_TAG


def ses_event(
    kind: str,
    message_id: str,
    recipient: str,
    *,
    intent_id: uuid.UUID | None = None,
    bounce_type: str = "Permanent",
) -> dict[str, Any]:
    mail: dict[str, Any] = {
        "timestamp": "2026-12-01T10:00:00.000Z",
        "messageId": message_id,
        "destination": [recipient],
        "tags": {INTENT_TAG: [str(intent_id)]} if intent_id else {},
    }
    event: dict[str, Any] = {"eventType": kind, "mail": mail}
    if kind == "Bounce":
        event["bounce"] = {
            "bounceType": bounce_type,
            "bounceSubType": "General",
            "bouncedRecipients": [{"emailAddress": recipient, "diagnosticCode": "550 5.1.1"}],
            "timestamp": "2026-12-01T10:00:05.000Z",
        }
    elif kind == "Complaint":
        event["complaint"] = {
            "complainedRecipients": [{"emailAddress": recipient}],
            "complaintFeedbackType": "abuse",
            "timestamp": "2026-12-01T10:05:00.000Z",
        }
    elif kind == "Delivery":
        event["delivery"] = {"recipients": [recipient], "timestamp": "2026-12-01T10:00:02.000Z"}
    return event


def resend_body(
    kind: str,
    email_id: str,
    recipient: str,
    *,
    intent_id: uuid.UUID | None = None,
    bounce_type: str = "Permanent",
) -> bytes:
    data: dict[str, Any] = {
        "email_id": email_id,
        "to": [recipient],
        "from": "Sluice <noreply@example.com>",
        "subject": "Hi",
        "created_at": "2026-12-01T10:00:00.000Z",
        "tags": [{"name": INTENT_TAG, "value": str(intent_id)}] if intent_id else [],
    }
    if kind == "email.bounced":
        data["bounce"] = {"type": bounce_type, "subType": "General", "message": "no mailbox"}
    return json.dumps(
        {"type": kind, "created_at": "2026-12-01T10:00:03.000Z", "data": data}
    ).encode()


def sendgrid_event(
    event: str,
    x_message_id: str,
    recipient: str,
    *,
    intent_id: uuid.UUID | None = None,
    event_id: str | None = None,
    bounce_type: str = "bounce",
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "email": recipient,
        "timestamp": int(time.time()),
        "event": event,
        "sg_event_id": event_id or uuid.uuid4().hex,
        # SendGrid's per-recipient id: the X-Message-Id of the send, then a suffix
        "sg_message_id": f"{x_message_id}.filterdrecv-6b4c7c-1-{uuid.uuid4().hex[:8]}",
    }
    if intent_id is not None:
        item[INTENT_TAG] = str(intent_id)
    if event == "bounce":
        item["type"] = bounce_type
        item["reason"] = "550 5.1.1 unknown user"
    return item


def sendgrid_body(events: list[dict[str, Any]]) -> bytes:
    return json.dumps(events).encode()
