"""What a message may carry beyond its template: the one definition of custom header names,
header values and tags.

Ingest refuses a bad header or tag when a client submits it (INVALID_ARGUMENT, naming the
field), and the sender refuses it again right before the wire, since ``SendBatch`` trusts
no caller. Both use these definitions, so whatever ingest stores the sender will send.

- Header names: RFC 5322 field-name characters, and only ``X-*`` or :data:`ALLOWED_HEADERS`;
  never one that changes who receives the message or who it claims to be from (``To``,
  ``Bcc``, ``From``, ``Reply-To``, ``Sender``...) nor the ``X-`` headers some servers read
  as routing (:data:`NEVER_X`).
- Header values: no control characters at all (C0 but TAB, DEL, C1) and no Unicode line or
  paragraph separators, since mail and HTTP libraries split lines on more than CR/LF; and
  no RFC 2047 encoded words, which mail libraries decode (CR/LF included) before writing
  the header out.
- Tags: what SES message tags accept, the strictest of the providers' tag fields (Resend's
  are the same; SendGrid's custom_args take any string).
"""

from __future__ import annotations

import re

# Characters a header value may never carry: every C0 control but TAB, DEL, every C1
# control (NEL U+0085 among them), and the Unicode line/paragraph separators.
_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# An RFC 2047 encoded word. Mail libraries decode these when they parse a header value and
# re-encode on output: Python's email package turned "=?utf-8?q?=0D=0ABcc:_x?=" in a
# custom header into a real CR LF Bcc line at the SMTP sink (found by the provider fuzz
# test). Values are Unicode, so nobody needs to pre-encode; adapters encode.
# Matched loosely (any "=?" ... "?="): the parser decoded words with spaces inside too.
_ENCODED_WORD = re.compile(r"=\?.*\?=")
# RFC 5322 field-name: printable US-ASCII except colon (76: a name and ": " fit a line).
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")
#: Header names (lower-case) a message may set besides ``X-*``.
ALLOWED_HEADERS = frozenset(
    {
        "list-unsubscribe",
        "list-unsubscribe-post",
        "list-id",
        "list-help",
        "feedback-id",
        "precedence",
        "auto-submitted",
        "x-entity-ref-id",
    }
)
#: ``X-`` headers (lower-case) a message may not set: servers read them as routing.
NEVER_X = frozenset({"x-original-to", "x-forwarded-to", "x-sender", "x-envelope-to"})
#: The headers Sluice writes itself when it has a one-click unsubscribe URL for a message.
UNSUBSCRIBE_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})
MAX_HEADER_VALUE = 2000

_TAG = re.compile(r"[A-Za-z0-9_-]{1,256}")
MAX_TAG = 256
#: Tag names starting with this are Sluice's own (the intent id tag among them).
RESERVED_TAG_PREFIX = "sluice_"


def is_field_name(name: str) -> bool:
    """True when ``name`` is a well-formed header name (RFC 5322 field-name, 1-76 chars)."""
    return _FIELD_NAME.fullmatch(name) is not None


def header_allowed(name: str) -> bool:
    """True when a message may set a header called ``name`` (well-formed, ``X-*`` but
    :data:`NEVER_X`, or :data:`ALLOWED_HEADERS`; case-insensitive)."""
    if not is_field_name(name):
        return False
    lower = name.lower()
    return lower in ALLOWED_HEADERS or (lower.startswith("x-") and lower not in NEVER_X)


def forbidden_character(value: str) -> str | None:
    """The first character of ``value`` a header may not carry, or None."""
    bad = _FORBIDDEN.search(value)
    return None if bad is None else bad.group()


def has_encoded_word(value: str) -> bool:
    """True when ``value`` holds something a mail library would decode as RFC 2047."""
    return _ENCODED_WORD.search(value) is not None


def is_tag_text(value: str) -> bool:
    """True when ``value`` may be a tag name or value: 1-256 ASCII letters, digits, ``_``
    or ``-``."""
    return _TAG.fullmatch(value) is not None
