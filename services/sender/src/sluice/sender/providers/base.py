"""The adapter interface every email provider implements (sandbox, SES, Resend, SendGrid,
SMTP), so the sender's servicer never knows which one it is talking to.

Contract of ``EmailProvider.send_batch``:

- ``plan`` is the one place that knows its provider's request shape: which of the given
  rendered messages go in which provider call, in the order the calls are made (Resend:
  100 per call; SendGrid: personalizations of the same content; SES and SMTP: one
  message per call; the sandbox: the whole batch in one). The servicer reserves exactly
  those calls from the rate limiter and hands ``send_batch`` the messages of the calls
  granted (the last one possibly cut short), so a plan must be stable under that: the
  plan of the messages of its first k calls, in their order, is those k calls
  (``largest_request`` bounds a call's size before content is known, for the preview).
- ``send_batch`` receives every rendered message the rate limiter granted, any number of
  them, and sends them in the calls ``plan`` makes of them. It does no throttling of its
  own.
- It returns exactly one ``ProviderResult`` per message, in the order given, each with
  the message's ``intent_id`` and one of these outcomes:

  ``accepted``     the provider took it; ``provider_message_id`` is its id (acceptance is
                   not delivery: webhooks report that later)
  ``throttled``    the provider refused it for rate or quota now; ``retry_after`` says when
  ``transient``    refused, may work later (``retry_after`` when the provider said when)
  ``unknown``      the request may have been received (a timeout after sending, a cut
                   connection): it may or may not be sent
  ``permanent``    will never work as asked; ``reason`` says why
  ``unavailable``  not handed over: this chunk never reached the provider

- It raises ``sluice.common.errors.Unavailable`` only when nothing at all was handed to
  the provider (``send_in_chunks`` does that). The servicer answers
  ``PROVIDER_UNAVAILABLE`` for those messages: the router retries them without spending
  an attempt and counts them against the provider's health, so it fails over.
- It passes an idempotency key to providers that take one, so a retry is not sent twice.
- It reads its provider's rate-limit headers itself (the one place that knows their names
  and units) and puts what they announced on the results (``Announced``), and it marks a
  refusal because a daily or monthly quota is used up (``quota_results``): the servicer
  hands both to the rate limiter, which slows down or pauses every replica.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal, Protocol, runtime_checkable

from sluice.common.errors import Unavailable
from sluice.common.headers import UNSUBSCRIBE_HEADERS
from sluice.common.logging import redact_email
from sluice.common.providers import ProviderConfig

# Each provider call an adapter will make, as indices into the messages it was given.
Plan = list[list[int]]
Outcome = Literal["accepted", "throttled", "transient", "unknown", "permanent", "unavailable"]

# The tag (SES message tag, Resend tag, SendGrid custom arg) carrying the intent id, so a
# provider's delivery events can be matched back to the intent.
INTENT_TAG = "sluice_intent_id"
# Prefix of ProviderResult.reason when a provider's daily (or monthly) quota is used up;
# the router can read "paused_until=<RFC 3339>" from it and route around the provider.
QUOTA_REASON = "quota exhausted"


@dataclass(frozen=True, slots=True)
class OutboundEmail:
    """One rendered message ready for a provider.

    ``headers`` are extra, already allow-listed headers; ``tags`` go to the provider's own
    tag field with the intent id added (``all_tags``).
    """

    intent_id: str
    recipient: str
    from_address: str
    subject: str
    html: str
    text: str
    idempotency_key: str
    reply_to: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    list_unsubscribe_url: str = ""

    def all_tags(self) -> tuple[tuple[str, str], ...]:
        """The message's tags with the intent id first."""
        return ((INTENT_TAG, self.intent_id), *(t for t in self.tags if t[0] != INTENT_TAG))

    def all_headers(self) -> tuple[tuple[str, str], ...]:
        """Extra headers plus List-Unsubscribe (and One-Click for https URLs, RFC 8058).

        With an unsubscribe URL, Sluice's own List-Unsubscribe headers replace any the
        message brought: two List-Unsubscribe headers leave the mailbox guessing which one
        works, and Sluice's link is the one that suppresses the recipient."""
        url = self.list_unsubscribe_url
        if not url:
            return self.headers
        extra = [("List-Unsubscribe", f"<{url}>")]
        if url.startswith("https://"):
            extra.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
        own = tuple(h for h in self.headers if h[0].lower() not in UNSUBSCRIBE_HEADERS)
        return (*own, *extra)


@dataclass(frozen=True, slots=True)
class Announced:
    """What a provider's answer said about its request limit, as its adapter read the
    headers: ``requests_per_second`` is its limit over its window (0 when it did not say
    both), ``reset_after`` the seconds until its window resets when the answer said no
    request is left in it (0 otherwise). Accepted answers announce too."""

    requests_per_second: float = 0.0
    reset_after: float = 0.0


@dataclass(frozen=True, slots=True)
class ProviderResult:
    """What the provider did with one message (see the module docstring for outcomes).

    ``quota`` marks a throttle because a daily or monthly quota is used up: it pauses the
    provider until ``retry_after`` and says nothing about its rate. ``announced`` is what
    the answer's rate-limit headers said, when they said anything.
    """

    intent_id: str
    outcome: Outcome
    provider_message_id: str = ""
    reason: str = ""
    retry_after: float = 0.0
    quota: bool = False
    announced: Announced | None = None


class EmailProvider(Protocol):
    """An email provider adapter; see the module docstring for the full contract."""

    @property
    def name(self) -> str:
        """The configured provider name (``ProviderConfig.name``)."""
        ...

    @property
    def largest_request(self) -> int | None:
        """The most messages one call can carry (None: any number), whatever the content:
        the request shape the limiter's preview assumes before messages are rendered."""
        ...

    def plan(self, messages: Sequence[OutboundEmail]) -> Plan:
        """The provider calls ``send_batch`` would make for ``messages``, in order."""
        ...

    async def send_batch(self, messages: Sequence[OutboundEmail]) -> list[ProviderResult]:
        """Sends the messages; one result per message, in order."""
        ...


@runtime_checkable
class ReadsAccountLimits(Protocol):
    """An adapter that can read its account's own limits from the provider (SES)."""

    async def account_limits(self, config: ProviderConfig) -> ProviderConfig:
        """``config`` with limits no higher than configured nor than the account allows."""
        ...


_ADDRESS = re.compile(r"[^\s<>@\"'(),;:]+@[^\s<>@\"'(),;:]+")


def provider_text(text: str, limit: int = 200) -> str:
    """A provider's own words for a reason: bounded, and with any address in it redacted
    (servers echo recipients: "550 <ada@example.com>: no such user"), since reasons are
    logged."""
    return _ADDRESS.sub(lambda m: redact_email(m.group(0)), text[:limit])


def results_for(
    messages: Sequence[OutboundEmail],
    outcome: Outcome,
    reason: str = "",
    retry_after: float = 0.0,
) -> list[ProviderResult]:
    """The same answer for every message (a whole request refused, timed out...)."""
    return [
        ProviderResult(m.intent_id, outcome, reason=reason, retry_after=retry_after)
        for m in messages
    ]


def quota_results(
    messages: Sequence[OutboundEmail], what: str, until: datetime
) -> list[ProviderResult]:
    """Throttled until a used-up quota resets at ``until``, with the reason the router reads
    (``QUOTA_REASON`` and ``paused_until=<RFC 3339>``) and ``quota`` set."""
    wait = max(1.0, (until - datetime.now(UTC)).total_seconds())
    reason = f"{QUOTA_REASON}; paused_until={until.strftime('%Y-%m-%dT%H:%M:%SZ')}; {what}"
    return [
        ProviderResult(m.intent_id, "throttled", reason=reason, retry_after=wait, quota=True)
        for m in messages
    ]


def announcing(results: list[ProviderResult], announced: Announced | None) -> list[ProviderResult]:
    """``results`` carrying what their answer announced."""
    if announced is None:
        return results
    return [replace(r, announced=announced) for r in results]


async def send_in_chunks(
    chunks: Sequence[Sequence[OutboundEmail]],
    send_chunk: Callable[[Sequence[OutboundEmail]], Awaitable[list[ProviderResult]]],
    *,
    concurrency: int,
) -> list[ProviderResult]:
    """Sends chunks at most ``concurrency`` at a time; results in message order.

    A chunk whose ``send_chunk`` raises ``Unavailable`` was not handed over: its messages
    answer ``unavailable``. When that is true of every chunk, ``Unavailable`` is raised.
    """
    gate = asyncio.Semaphore(max(1, concurrency))
    failures: list[Unavailable] = []

    async def one(chunk: Sequence[OutboundEmail]) -> list[ProviderResult]:
        async with gate:
            try:
                results = await send_chunk(chunk)
            except Unavailable as exc:
                failures.append(exc)
                return results_for(chunk, "unavailable", reason=str(exc))
        if len(results) != len(chunk):
            raise RuntimeError(f"{len(results)} results for {len(chunk)} messages")
        return results

    per_chunk = await asyncio.gather(*(one(c) for c in chunks))
    if chunks and len(failures) == len(chunks):
        raise failures[0]
    return [r for results in per_chunk for r in results]


def consecutive(n: int, size: int) -> Plan:
    """The plan of ``n`` messages in consecutive calls of at most ``size``."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def planned(messages: Sequence[OutboundEmail], plan: Plan) -> list[list[OutboundEmail]]:
    """The messages of each planned call."""
    return [[messages[i] for i in call] for call in plan]
