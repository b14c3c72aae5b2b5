"""One typed delivery event, whatever provider reported it.

Each provider's webhook payload is parsed (after its signature is verified) into
:class:`DeliveryEvent` values; everything downstream (storage, state transitions,
suppression, guards, watchers) reads only these.

Event types and what they do to an intent:

=============  ==================================  ========================================
type           intent status                       suppression
=============  ==================================  ========================================
delivered      ``delivered``                       none
bounced/hard   ``bounced``                         the address, reason ``hard_bounce``
bounced/soft   ``bounced``                         after N soft bounces in a window
complained     ``complained``                      the address, reason ``complaint``
unsubscribed   unchanged                           the address, reason ``unsubscribe``
opened,        unchanged (kept in the history)     none
clicked,
deferred,
dropped
=============  ==================================  ========================================

Intent statuses only move forward along ``sent < delivered < bounced < complained``, so an
event that arrives late (a delivery after the bounce) is stored but changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

EventType = Literal[
    "delivered",
    "bounced",
    "complained",
    "opened",
    "clicked",
    "deferred",
    "dropped",
    "unsubscribed",
]
EVENT_TYPES: tuple[EventType, ...] = (
    "delivered",
    "bounced",
    "complained",
    "opened",
    "clicked",
    "deferred",
    "dropped",
    "unsubscribed",
)
BounceType = Literal["hard", "soft"]

#: Where an event type puts an intent; types not listed leave it where it is.
RANK: dict[str, int] = {"delivered": 1, "bounced": 2, "complained": 3}

#: The tag (SES message tag, Resend tag, SendGrid custom arg) that carries the intent id.
INTENT_TAG = "sluice_intent_id"

#: Webhook sources: the path under /webhooks/ and the ``source`` column of stored events.
Source = Literal["ses", "resend", "sendgrid", "unsubscribe"]


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    """A provider's report about one message to one recipient."""

    source: Source
    #: Unique per source: SNS MessageId, svix-id, sg_event_id (a suffix when one provider
    #: message reports several recipients).
    event_id: str
    type: EventType
    occurred_at: datetime
    #: The provider's id of the message, as the sender stored it on the intent.
    provider_message_id: str | None
    #: The intent id carried in the message's tags, when the sender put it there.
    intent_id: UUID | None
    #: Normalised like ingest stores recipients; None when the payload names none.
    recipient: str | None
    bounce: BounceType | None = None
    detail: str = ""
    raw: Any = None
