"""Signed one-click unsubscribe links (RFC 8058), shared by the sender and ingest.

A token names an intent and an expiry and carries an HMAC-SHA256 of both under a secret
only Sluice knows, so it cannot be guessed or altered, and it stops working after its TTL.
The address is not in the link (links end up in logs and proxies); ingest looks it up from
the intent when the link is used. Form::

    <intent id, 32 hex>.<expiry, unix seconds>.<HMAC, base64url, 22 chars>

The sender puts :func:`unsubscribe_url` in ``List-Unsubscribe`` together with
``List-Unsubscribe-Post: List-Unsubscribe=One-Click``; the mailbox provider then POSTs
``List-Unsubscribe=One-Click`` to it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid

_MAC_BYTES = 16  # 128 bits: unguessable, and keeps the URL short


class BadToken(ValueError):
    """The token is malformed, forged or expired."""


def _mac(secret: bytes, intent_hex: str, expiry: int) -> str:
    digest = hmac.new(secret, f"unsub.{intent_hex}.{expiry}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:_MAC_BYTES]).decode().rstrip("=")


def make_token(secret: bytes, intent_id: uuid.UUID, *, ttl: float, now: float | None = None) -> str:
    """A token for ``intent_id`` valid for ``ttl`` seconds."""
    if not secret:
        raise ValueError("an unsubscribe secret is required")
    expiry = int((time.time() if now is None else now) + ttl)
    return f"{intent_id.hex}.{expiry}.{_mac(secret, intent_id.hex, expiry)}"


def read_token(secret: bytes, token: str, *, now: float | None = None) -> uuid.UUID:
    """The intent id of a valid token; raises BadToken otherwise."""
    parts = token.split(".")
    if len(parts) != 3 or not secret:
        raise BadToken("not an unsubscribe token")
    intent_hex, expiry_text, mac = parts
    try:
        intent_id = uuid.UUID(hex=intent_hex)
        expiry = int(expiry_text)
    except ValueError:
        raise BadToken("not an unsubscribe token") from None
    if not hmac.compare_digest(mac.encode(), _mac(secret, intent_id.hex, expiry).encode()):
        raise BadToken("the unsubscribe token's signature does not match")
    if (time.time() if now is None else now) > expiry:
        raise BadToken("the unsubscribe token has expired")
    return intent_id


def unsubscribe_url(
    base_url: str, secret: bytes, intent_id: uuid.UUID, *, ttl: float, now: float | None = None
) -> str:
    """``<base_url>/unsubscribe/<token>``, for the ``List-Unsubscribe`` header."""
    return f"{base_url.rstrip('/')}/unsubscribe/{make_token(secret, intent_id, ttl=ttl, now=now)}"


class UnsubscribeLinks:
    """Makes each bulk message's one-click unsubscribe URL ("" when not configured)."""

    #: Only bulk mail carries List-Unsubscribe; transactional mail is not a subscription.
    KINDS = frozenset({"marketing", "digest"})

    def __init__(self, base_url: str, secret: str, *, ttl_days: float) -> None:
        self._base_url = base_url
        self._secret = secret.encode()
        self._ttl = ttl_days * 86_400.0

    @property
    def enabled(self) -> bool:
        """True when both the base URL and the secret are set."""
        return bool(self._base_url and self._secret)

    def for_intent(self, intent_id: uuid.UUID, kind: str) -> str:
        """The URL for one intent, or "" (not configured, or not bulk mail)."""
        if not self.enabled or kind not in self.KINDS:
            return ""
        return unsubscribe_url(self._base_url, self._secret, intent_id, ttl=self._ttl)
