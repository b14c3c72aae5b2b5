"""The names Sluice stores and the protobuf enums it speaks, and the mapping between them.

PostgreSQL keeps readable enum labels (``pending``, ``marketing``); the wire uses
``sluice.v1`` enums. Every conversion goes through the tables here.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from sluice.v1 import intent_pb2

KIND_TO_PROTO: dict[str, intent_pb2.Intent.ValueType] = {
    "transactional": intent_pb2.INTENT_TRANSACTIONAL,
    "marketing": intent_pb2.INTENT_MARKETING,
    "digest": intent_pb2.INTENT_DIGEST,
}
PROTO_TO_KIND: dict[int, str] = {v: k for k, v in KIND_TO_PROTO.items()}

STATUS_TO_PROTO: dict[str, intent_pb2.IntentStatus.ValueType] = {
    "pending": intent_pb2.INTENT_STATUS_PENDING,
    "leased": intent_pb2.INTENT_STATUS_LEASED,
    "sent": intent_pb2.INTENT_STATUS_SENT,
    "delivered": intent_pb2.INTENT_STATUS_DELIVERED,
    "bounced": intent_pb2.INTENT_STATUS_BOUNCED,
    "complained": intent_pb2.INTENT_STATUS_COMPLAINED,
    "failed": intent_pb2.INTENT_STATUS_FAILED,
    "cancelled": intent_pb2.INTENT_STATUS_CANCELLED,
    "suppressed": intent_pb2.INTENT_STATUS_SUPPRESSED,
    "expired": intent_pb2.INTENT_STATUS_EXPIRED,
}
PROTO_TO_STATUS: dict[int, str] = {v: k for k, v in STATUS_TO_PROTO.items()}

TERMINAL_STATUSES = frozenset(
    {"delivered", "bounced", "complained", "failed", "cancelled", "suppressed", "expired"}
)

# Lower leases first: a password reset must not wait behind a campaign.
PRIORITY = {"transactional": 0, "digest": 1, "marketing": 2}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp for an aware datetime (None stays None). Exact to the
    microsecond, as ``Timestamp.FromDatetime`` is, at a fraction of its cost (it is plain
    Python, and every intent answered carries four timestamps)."""
    if value is None:
        return None
    delta = value.astimezone(UTC) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def from_timestamp(value: timestamp_pb2.Timestamp) -> datetime:
    """An aware UTC datetime for a protobuf Timestamp."""
    return value.ToDatetime(tzinfo=UTC)
