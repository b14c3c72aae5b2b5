"""What the sender refuses to put on the wire, whoever asked it to.

``SendBatch`` is reachable by anything that can reach the sender (and, with tokens, by any
holder of the ``send`` scope), so it trusts nothing in a request. Every address and every
header value of a message is checked here, once, right before the message would be handed
to a provider; a refused message gets a permanent result naming the field and is never
sent. The rules:

- Recipient: one bare address (no display name), valid by the rule ingest applies
  (:func:`sluice.common.addresses.check_recipient`: email-validator in strict mode, with its
  proven fast path for plain ASCII addresses), internationalised addresses allowed.
- From and reply-to: one address, optionally with a display name; the from-address's domain
  must be one of ``from_domains`` when that list is set (otherwise anyone able to call the
  sender could send as any domain the provider account is verified for).
- Every header value (subject after rendering, from, reply-to, recipient, custom headers, tags,
  the intent id and idempotency key, which adapters put into headers and tags): the rules of
  ``sluice.common.headers`` (no control characters, line separators or RFC 2047 encoded
  words), and length caps.
- Custom header names: ``X-*`` plus the short allow-list of ``sluice.common.headers``, the
  same definition ingest checks submissions against.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

from sluice.common.addresses import RecipientError, check_recipient
from sluice.common.headers import (
    MAX_HEADER_VALUE,
    forbidden_character,
    has_encoded_word,
    header_allowed,
    is_field_name,
)

MAX_SUBJECT = 998  # RFC 5322's line limit; a longer subject is folded noise
MAX_ID = 256  # Resend's Idempotency-Key limit, and plenty for an intent id


class Refused(ValueError):
    """The message must not be sent; ``str()`` names the field and the reason."""


@dataclass(frozen=True, slots=True)
class MessageChecks:
    """The checks, configured: ``from_domains`` (lower-case ASCII domains) limits the
    from-address to those domains; empty allows any valid one."""

    from_domains: frozenset[str] = frozenset()

    def refusal(
        self,
        *,
        intent_id: str,
        idempotency_key: str,
        recipient: str,
        from_address: str,
        subject: str,
        reply_to: str = "",
        headers: Iterable[tuple[str, str]] = (),
        tags: Iterable[tuple[str, str]] = (),
    ) -> str | None:
        """Why this message may not be sent, or None when everything checks out."""
        try:
            self.check(
                intent_id=intent_id,
                idempotency_key=idempotency_key,
                recipient=recipient,
                from_address=from_address,
                subject=subject,
                reply_to=reply_to,
                headers=headers,
                tags=tags,
            )
        except Refused as exc:
            return str(exc)
        return None

    def check(
        self,
        *,
        intent_id: str,
        idempotency_key: str,
        recipient: str,
        from_address: str,
        subject: str,
        reply_to: str = "",
        headers: Iterable[tuple[str, str]] = (),
        tags: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Raises ``Refused`` for the first field that may not go on the wire."""
        if not intent_id:
            raise Refused("intent_id: required")
        header_value("intent_id", intent_id, MAX_ID)
        header_value("idempotency_key", idempotency_key, MAX_ID)
        bare_address("recipient", recipient)
        domain = named_address("from_address", from_address)
        if self.from_domains and domain not in self.from_domains:
            raise Refused(f"from_address: domain {domain!r} is not one this sender may send from")
        if reply_to:
            named_address("reply_to", reply_to)
        header_value("subject", subject, MAX_SUBJECT)
        for name, value in headers:
            header_name(name)
            header_value(f"headers[{name}]", value, MAX_HEADER_VALUE)
        for key, value in tags:
            header_value("tags", key, MAX_ID)
            header_value(f"tags[{key}]", value, MAX_ID)


def header_value(field: str, value: str, limit: int) -> None:
    """Refuses control characters, line separators and values longer than ``limit``."""
    bad = forbidden_character(value)
    if bad is not None:
        raise Refused(f"{field}: contains the control character U+{ord(bad):04X}")
    if has_encoded_word(value):
        raise Refused(f"{field}: contains an RFC 2047 encoded word (=?charset?q?...?=)")
    if len(value) > limit:
        raise Refused(f"{field}: longer than {limit} characters")


def header_name(name: str) -> None:
    """Refuses malformed names and any header outside ``X-*`` and the allow-list."""
    if not is_field_name(name):
        raise Refused(f"headers: {name!r} is not a valid header name")
    if not header_allowed(name):
        raise Refused(f"headers: {name!r} may not be set by a message")


def bare_address(field: str, value: str) -> None:
    """Validates one bare address (no display name) by ingest's recipient rule."""
    if not value:
        raise Refused(f"{field}: required")
    header_value(field, value, MAX_HEADER_VALUE)
    try:
        check_recipient(value)
    except RecipientError as exc:
        raise Refused(f"{field}: {exc}") from exc


def named_address(field: str, value: str) -> str:
    """Validates one address with an optional display name; returns its lower-cased ASCII
    domain."""
    if not value:
        raise Refused(f"{field}: required")
    header_value(field, value, MAX_HEADER_VALUE)
    domain, refusal = _named_address(value)
    if refusal is not None:
        raise Refused(f"{field}: {refusal}")
    return domain


@functools.lru_cache(maxsize=1024)
def _named_address(value: str) -> tuple[str, str | None]:
    """(ASCII domain, None) for a valid address, or ("", why not). Cached: a batch's from
    and reply-to addresses are the same for every message of it."""
    try:
        result = validate_email(
            value,
            check_deliverability=False,
            allow_smtputf8=True,
            allow_display_name=True,
        )
    except EmailNotValidError as exc:
        return "", str(exc)
    return str(result.ascii_domain).lower(), None
