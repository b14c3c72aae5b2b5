"""ListIntents page tokens (AIP-158): opaque to clients, checked strictly when they return.

A token carries the (created_at, id) keyset cursor of the last row of a page and a
fingerprint of the filters it was issued for. Anything a client sends as a token is
untrusted: every way it can be malformed (not base64, not JSON, wrong types, a date that
overflows when converted to UTC, deep nesting) is INVALID_ARGUMENT, never INTERNAL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from datetime import UTC, datetime

from sluice.common.errors import InvalidArgument

MAX_TOKEN_LENGTH = 512  # tokens we issue are ~130 characters
PAGE_TOKEN_INVALID = "PAGE_TOKEN_INVALID"  # noqa: S105  (an error reason, not a secret)


def _invalid(description: str) -> InvalidArgument:
    exc = InvalidArgument("page_token is not valid", [("page_token", description)])
    exc.reason = PAGE_TOKEN_INVALID
    return exc


def filter_fingerprint(campaign_id: str, status: int, *more: str) -> str:
    """Names the filters a token belongs to: a token is only valid with the same ones.
    Filters added later count only when set, so tokens issued before them stay valid."""
    extra = "".join(f"\x00{m}" for m in more) if any(more) else ""
    return hashlib.sha256(f"{campaign_id}\x00{status}{extra}".encode()).hexdigest()[:16]


def encode_page_token(created_at: datetime, intent_id: uuid.UUID, fingerprint: str) -> str:
    """The token for the page after the row (created_at, intent_id)."""
    raw = json.dumps({"t": created_at.isoformat(), "i": str(intent_id), "f": fingerprint})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, fingerprint: str) -> tuple[datetime, uuid.UUID]:
    """The cursor of a token, or InvalidArgument (reason PAGE_TOKEN_INVALID)."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise _invalid("not a token this server issued")
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        parsed = datetime.fromisoformat(raw["t"])
        # A naive time would be read as local time; an aware one may overflow in UTC.
        created_at = parsed.astimezone(UTC) if parsed.tzinfo else None
        intent_id = uuid.UUID(raw["i"])
        issued_for = raw["f"]
    except (
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        OverflowError,
        RecursionError,
        binascii.Error,
    ):
        raise _invalid("not a token this server issued") from None
    if created_at is None:
        raise _invalid("not a token this server issued")
    if issued_for != fingerprint:
        exc = InvalidArgument(
            "page_token was issued for other filters",
            [("page_token", "use it with the same campaign_id and status it came with")],
        )
        exc.reason = PAGE_TOKEN_INVALID
        raise exc
    return created_at, intent_id
