"""AIP-158 page tokens for the catalogue's list calls (templates, suppressions, intents).

A token carries the keyset position of the last row of a page and a fingerprint of the
filters it was issued for; it is only valid with those same filters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from sluice.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """The page size to use for a request's ``page_size`` (0 means the default)."""
    if requested < 0:
        raise InvalidArgument("page_size is negative", [("page_size", "must not be negative")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def fingerprint(*filters: object) -> str:
    """A short digest of the filters a token belongs to."""
    raw = "\x00".join(str(f) for f in filters)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def encode(position: Sequence[Any], filters: str) -> str:
    """A token for the page after ``position`` (JSON-serialisable values)."""
    raw = json.dumps({"p": list(position), "f": filters}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(token: str, filters: str) -> list[Any]:
    """The position a token carries; InvalidArgument when it is not ours or was issued for
    other filters."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        position = raw["p"]
        issued_for = raw["f"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        position = issued_for = None
    if not isinstance(position, list):
        raise InvalidArgument(
            "page_token is not valid", [("page_token", "not a token this server issued")]
        )
    if issued_for != filters:
        raise InvalidArgument(
            "page_token was issued for other filters",
            [("page_token", "use it with the same filters it came with")],
        )
    return position
