"""Resend's webhooks, signed by Svix: HMAC-SHA256 over ``id.timestamp.body``.

The secret is shown as ``whsec_<base64>``; the key is the base64-decoded part. The
``svix-signature`` header lists space-separated ``v1,<base64>`` entries (more than one while
a secret is being rotated); any one matching is enough. The timestamp must be within the
tolerance either way, which bounds how long a captured request can be replayed; inside
that window a replay carries an ``svix-id`` already stored and changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence

from sluice.ingest.webhooks.errors import forged, malformed, stale

_PREFIX = "whsec_"


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_...`` secret; ValueError if it is not one."""
    raw = secret.strip()
    raw = raw.removeprefix(_PREFIX)
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a Resend (Svix) webhook secret is whsec_ followed by base64") from exc
    if len(key) < 16:
        raise ValueError("a Resend (Svix) webhook secret decodes to fewer than 16 bytes")
    return key


def sign(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    """The ``v1,<base64>`` signature Svix sends for these values (used by tests and tools)."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(
    keys: Sequence[bytes],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    tolerance: float,
) -> str:
    """Checks a Svix-signed request; returns its ``svix-id``. Raises WebhookRejected."""
    msg_id = headers.get("svix-id", "")
    timestamp = headers.get("svix-timestamp", "")
    signatures = headers.get("svix-signature", "")
    if not (msg_id and timestamp and signatures):
        raise forged("svix-id, svix-timestamp and svix-signature are required")
    try:
        sent = int(timestamp)
    except ValueError:
        raise malformed("svix-timestamp is not an integer") from None
    if abs(now - sent) > tolerance:
        raise stale(f"svix-timestamp is {int(now - sent)} s from now")
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = [hmac.new(k, signed, hashlib.sha256).digest() for k in keys]
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        # Every candidate is compared in constant time; which key matched does not matter.
        if any(hmac.compare_digest(given, e) for e in expected):
            return msg_id
    raise forged("no svix-signature entry matches")
