"""Builders shared by the tests/db tests (not collected: no test_ prefix)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sluice.ingest.repository import NewIntent

PRIORITY = {"transactional": 0, "digest": 1, "marketing": 2}


def new_intent(
    key: str,
    *,
    payload: bytes = b"payload-1",
    kind: str = "marketing",
    campaign_id: str = "spring",
    recipient: str = "alice@example.com",
    template_id: str = "welcome",
    send_at: datetime | None = None,
    deadline: timedelta = timedelta(hours=6),
    variables: dict[str, str] | None = None,
    traceparent: str | None = None,
    reply_to: str | None = None,
    headers: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
) -> NewIntent:
    """A valid NewIntent with a fresh id; due one minute ago unless ``send_at`` says when."""
    start = send_at if send_at is not None else datetime.now(UTC) - timedelta(minutes=1)
    return NewIntent(
        id=uuid.uuid4(),
        idempotency_key=key,
        payload_hash=payload,
        campaign_id=campaign_id,
        recipient=recipient,
        kind=kind,
        priority=PRIORITY[kind],
        template_id=template_id,
        variables=variables if variables is not None else {"name": "Alice"},
        send_at=start,
        deadline=start + deadline,
        traceparent=traceparent,
        reply_to=reply_to,
        headers=headers,
        tags=tags,
    )
