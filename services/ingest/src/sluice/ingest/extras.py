"""A submission's reply-to, custom headers and tags: checked at ingest so that a message is
never refused at send time for something the client could have been told at once.

The header and tag rules are ``sluice.common.headers``, the definitions the sender checks
again before the wire, so whatever is stored here the sender will send. On top of them
ingest bounds what one intent may carry (stored on the row, read by every lease):

- ``reply_to``: one bare address through the recipients' strict path, stored in ASCII form
  (see :func:`sluice.common.addresses.check_reply_to`).
- ``headers``: at most :data:`MAX_HEADERS`, names unique case-insensitively, values 1 to
  ``MAX_HEADER_VALUE`` characters, :data:`MAX_HEADERS_TOTAL` characters in all.
- ``tags``: at most :data:`MAX_TAGS` (the sender adds the intent id tag); names and values
  1-256 of ``[A-Za-z0-9_-]``, names not starting ``sluice_``.

Absent extras are None, not empty maps, so an intent without them stores NULLs and the
common case costs three emptiness checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice.common.addresses import RecipientError, check_reply_to
from sluice.common.headers import (
    ALLOWED_HEADERS,
    MAX_HEADER_VALUE,
    RESERVED_TAG_PREFIX,
    forbidden_character,
    has_encoded_word,
    header_allowed,
    is_field_name,
    is_tag_text,
)
from sluice.ingest.violations import (
    R_CONTROL,
    R_ENCODED_WORD,
    R_HEADER_DUPLICATE,
    R_HEADER_NAME,
    R_REPLY_TO,
    R_REQUIRED,
    R_TAG,
    R_TOO_LONG,
    Violations,
    quote,
)
from sluice.v1 import intent_pb2

MAX_REPLY_TO_LENGTH = 320  # as for recipients: far above the 254 SMTP allows
MAX_HEADERS = 20
MAX_HEADERS_TOTAL = 8 * 1024  # characters of names and values together
MAX_TAGS = 10

_ALLOWED_TEXT = "X-* or one of " + ", ".join(sorted(h for h in ALLOWED_HEADERS if h[:2] != "x-"))
_TAG_TEXT = "1-256 ASCII letters, digits, '_' or '-'"


@dataclass(frozen=True, slots=True)
class Extras:
    """The checked extras of one submission; None for each one not given."""

    reply_to: str | None = None
    headers: dict[str, str] | None = None
    tags: dict[str, str] | None = None


NO_EXTRAS = Extras()


def check_extras(sub: intent_pb2.IntentSubmission, v: Violations) -> Extras:
    """The submission's extras, checked; every problem is added to ``v``. Callers skip
    the call when the submission has none (:data:`NO_EXTRAS`)."""
    return Extras(
        reply_to=_reply_to(sub.reply_to, v) if sub.reply_to else None,
        headers=_headers(dict(sub.headers), v) if sub.headers else None,
        tags=_tags(dict(sub.tags), v) if sub.tags else None,
    )


def _reply_to(value: str, v: Violations) -> str | None:
    if len(value) > MAX_REPLY_TO_LENGTH:
        v.add("reply_to", f"at most {MAX_REPLY_TO_LENGTH} characters", R_TOO_LONG)
        return None
    try:
        return check_reply_to(value)
    except RecipientError as exc:
        v.add("reply_to", str(exc)[:200], R_REPLY_TO)
        return None


def _headers(headers: dict[str, str], v: Violations) -> dict[str, str] | None:
    if len(headers) > MAX_HEADERS:
        v.add("headers", f"at most {MAX_HEADERS} headers, got {len(headers)}", R_TOO_LONG)
        return None
    seen: dict[str, str] = {}
    total = 0
    for name, value in sorted(headers.items()):
        total += len(name) + len(value)
        field = f"headers[{quote(name)}]"
        if not is_field_name(name):
            v.add(field, "not a header name (1-76 printable ASCII, no ':' or space)", R_HEADER_NAME)
        elif not header_allowed(name):
            v.add(field, f"may not be set; allowed: {_ALLOWED_TEXT}", R_HEADER_NAME)
        elif name.lower() in seen:
            same = quote(seen[name.lower()])
            v.add(
                field, f"the same header as {same} (names are case-insensitive)", R_HEADER_DUPLICATE
            )
        elif not value:
            v.add(field, "required (a header needs a value)", R_REQUIRED)
        elif len(value) > MAX_HEADER_VALUE:
            v.add(field, f"at most {MAX_HEADER_VALUE} characters, got {len(value)}", R_TOO_LONG)
        elif (bad := forbidden_character(value)) is not None:
            v.add(
                field, f"must be one line without control characters (U+{ord(bad):04X})", R_CONTROL
            )
        elif has_encoded_word(value):
            v.add(field, "must not contain an RFC 2047 encoded word (=?...?=)", R_ENCODED_WORD)
        seen.setdefault(name.lower(), name)
    if total > MAX_HEADERS_TOTAL:
        v.add("headers", f"at most {MAX_HEADERS_TOTAL} characters in all", R_TOO_LONG)
    return headers


def _tags(tags: dict[str, str], v: Violations) -> dict[str, str] | None:
    if len(tags) > MAX_TAGS:
        v.add("tags", f"at most {MAX_TAGS} tags, got {len(tags)}", R_TOO_LONG)
        return None
    for name, value in sorted(tags.items()):
        field = f"tags[{quote(name)}]"
        if not is_tag_text(name):
            v.add(field, f"tag names are {_TAG_TEXT} (what SES accepts)", R_TAG)
        elif name.lower().startswith(RESERVED_TAG_PREFIX):
            v.add(field, f"tag names starting {RESERVED_TAG_PREFIX!r} are reserved", R_TAG)
        elif not is_tag_text(value):
            v.add(field, f"tag values are {_TAG_TEXT} (what SES accepts)", R_TAG)
    return tags
