"""How ingest reports what is wrong with a submission: field violations, their stable
reasons, and how much of the client's input an error may quote.

An error lists every bad field at once (up to :data:`MAX_VIOLATIONS`), so a client fixes
its request in one round trip. Each violation carries a stable reason (README, "Error
reasons"); the error's ``reason`` is that of the first violation. Nothing a client sent is
quoted at more than :data:`QUOTE_CHARS` characters: an error travels in the gRPC trailer,
which clients cap at 16 KiB, and a long quoted input would turn a precise answer into
"metadata size exceeds hard limit".
"""

from __future__ import annotations

import re

import grpc

from sluice.common.errors import InvalidArgument

MAX_VIOLATIONS = 10
MESSAGE_VIOLATIONS = 3  # the message names the first few; the details have them all
QUOTE_CHARS = 40

# Characters that must not reach a header (subject) or a single-line identifier: C0/C1
# controls (CR, LF, NUL among them), line/paragraph separators and the bidi controls that
# make text display differently from what it is.
UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")

# Error reasons (ErrorInfo.reason and ItemError.reason); documented in the README.
R_INVALID = "INVALID_ARGUMENT"
R_REQUIRED = "FIELD_REQUIRED"
R_TOO_LONG = "FIELD_TOO_LONG"
R_CONTROL = "CONTROL_CHARACTERS"
R_RECIPIENT = "RECIPIENT_INVALID"
R_SMTPUTF8 = "SMTPUTF8_UNSUPPORTED"
R_TEMPLATE = "TEMPLATE_NOT_FOUND"
R_VARIABLES = "VARIABLES_MISMATCH"
R_TIME = "TIME_OUT_OF_RANGE"
R_REPLY_TO = "REPLY_TO_INVALID"
R_HEADER_NAME = "HEADER_NOT_ALLOWED"
R_HEADER_DUPLICATE = "HEADER_DUPLICATE"
R_ENCODED_WORD = "ENCODED_WORD"
R_TAG = "TAG_INVALID"

# A reason whose request is well-formed but cannot be served as the system is configured.
_REASON_CODES = {R_SMTPUTF8: grpc.StatusCode.FAILED_PRECONDITION}


def quote(value: str) -> str:
    """``value`` as it may appear in an error: repr'd, at most QUOTE_CHARS characters."""
    if len(value) <= QUOTE_CHARS:
        return repr(value)
    return repr(value[:QUOTE_CHARS]) + f"... ({len(value)} characters)"


class Violations:
    """The violations of one submission, each ``(path, description, reason)``; paths are
    prefixed with ``prefix`` (``intent`` or ``intents[3]``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.items: list[tuple[str, str, str]] = []
        self.dropped = 0

    def add(self, field: str, description: str, reason: str = R_INVALID) -> None:
        if len(self.items) >= MAX_VIOLATIONS:
            self.dropped += 1
            return
        path = f"{self.prefix}.{field}" if self.prefix else field
        self.items.append((path, description, reason))

    def text(self, field: str, value: str, limit: int, *, required: bool = False) -> None:
        """Length and control-character checks of a single-line identifier field."""
        if not value:
            if required:
                self.add(field, "required", R_REQUIRED)
        elif len(value) > limit:
            self.add(field, f"at most {limit} characters, got {len(value)}", R_TOO_LONG)
        elif UNSAFE_LINE.search(value) or not value.isprintable():
            self.add(field, "must be printable text (no control characters)", R_CONTROL)

    def error(self) -> InvalidArgument:
        described = [(f, d) for f, d, _ in self.items]
        more = f" (and {self.dropped} more)" if self.dropped else ""
        count = len(self.items) + self.dropped
        shown = "; ".join(f"{f}: {d}" for f, d in described[:MESSAGE_VIOLATIONS])
        if count > MESSAGE_VIOLATIONS:
            shown += "; ..."
        exc = InvalidArgument(
            f"{count} invalid field{'s' if count > 1 else ''}{more}: {shown}", described
        )
        exc.reason = self.items[0][2]
        exc.code = _REASON_CODES.get(exc.reason, exc.code)
        return exc
