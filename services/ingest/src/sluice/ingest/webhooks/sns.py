"""SES events through Amazon SNS: message signatures, signing certificates, subscriptions.

SNS signs a canonical string built from some of the message's fields (which ones depends on
``Type``) with the private key of a certificate it publishes at ``SigningCertURL``:
SignatureVersion 1 is RSA with SHA-1, version 2 RSA with SHA-256. The certificate is only
trusted when it comes over HTTPS (verified TLS) from an SNS host,
``sns.<region>.amazonaws.com`` or ``sns.<region>.amazonaws.com.cn``; otherwise anyone could
sign a message with a certificate of their own. Certificates are cached by URL (SNS rotates
them by publishing new URLs). Only topics on the allow-list are accepted, and a
SubscriptionConfirmation is confirmed (its ``SubscribeURL`` visited) only for those.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sluice.ingest.webhooks.errors import WebhookRejected, forged, malformed, stale

#: Hosts SNS publishes signing certificates and subscription URLs on.
SNS_HOST = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?")

_NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_SUBSCRIPTION_FIELDS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
_TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
_MAX_CERT_BYTES = 64 * 1024
_CACHE_SIZE = 32


def string_to_sign(message: Mapping[str, Any]) -> bytes:
    """The canonical string SNS signs: ``name\\nvalue\\n`` for each field, in order.

    ``Subject`` is left out of a Notification that has none."""
    names = _NOTIFICATION_FIELDS if message.get("Type") == "Notification" else _SUBSCRIPTION_FIELDS
    out = []
    for name in names:
        value = message.get(name)
        if value is None:
            if name == "Subject":
                continue
            raise malformed(f"SNS message has no {name}")
        out.append(f"{name}\n{value}\n")
    return "".join(out).encode()


def _hash_for(version: str) -> hashes.HashAlgorithm:
    if version == "1":
        return hashes.SHA1()  # noqa: S303  (SNS SignatureVersion 1 is defined as SHA1withRSA)
    if version == "2":
        return hashes.SHA256()
    raise forged(f"unsupported SNS SignatureVersion {version!r}")


def verify_signature(message: Mapping[str, Any], public_key: rsa.RSAPublicKey) -> None:
    """Checks ``Signature`` against the key; raises WebhookRejected."""
    algorithm = _hash_for(str(message.get("SignatureVersion", "")))
    try:
        signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
        public_key.verify(signature, string_to_sign(message), padding.PKCS1v15(), algorithm)
    except (InvalidSignature, binascii.Error, ValueError):
        raise forged("the SNS signature does not verify") from None


@dataclass
class SnsVerifier:
    """Verifies SNS messages for an allow-list of topics, fetching certificates as needed.

    ``cert_host`` and ``cert_port`` exist so a test can serve certificates from a local
    HTTPS server it trusts (through ``ssl_context``); production uses the defaults.
    """

    topics: frozenset[str]
    session: aiohttp.ClientSession
    max_age: float = 3600.0
    cert_host: re.Pattern[str] = SNS_HOST
    cert_port: int | None = None
    ssl_context: ssl.SSLContext | None = None
    fetch_timeout: float = 5.0
    _cache: OrderedDict[str, rsa.RSAPublicKey] = field(default_factory=OrderedDict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def check_url(self, url: str, what: str) -> str:
        """``url`` if it is HTTPS on an SNS host; WebhookRejected otherwise."""
        parts = urlsplit(url)
        port_ok = (
            parts.port in (None, 443) if self.cert_port is None else (parts.port == self.cert_port)
        )
        if (
            parts.scheme != "https"
            or parts.username is not None
            or parts.password is not None
            or not parts.hostname
            or not self.cert_host.fullmatch(parts.hostname)
            or not port_ok
        ):
            raise forged(f"{what} is not an HTTPS URL on an SNS host")
        return url

    async def verify(self, body: bytes, *, now: float | None = None) -> dict[str, Any]:
        """Parses and verifies an SNS request body; returns the message. Raises
        WebhookRejected (topic not allowed, stale, forged, malformed)."""
        try:
            message = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise malformed("the SNS body is not JSON") from None
        if not isinstance(message, dict) or message.get("Type") not in _TYPES:
            raise malformed("not an SNS message")
        if message.get("TopicArn") not in self.topics:
            raise WebhookRejected(400, "topic", "the SNS topic is not on the allow-list")
        try:
            sent = datetime.fromisoformat(str(message.get("Timestamp", ""))).timestamp()
        except ValueError:
            raise malformed("the SNS Timestamp is not ISO 8601") from None
        age = (time.time() if now is None else now) - sent
        if age > self.max_age or age < -300:
            raise stale(f"the SNS message is {int(age)} s old")
        url = self.check_url(str(message.get("SigningCertURL", "")), "SigningCertURL")
        verify_signature(message, await self._certificate_key(url))
        return message

    async def confirm(self, message: Mapping[str, Any]) -> None:
        """Visits the SubscribeURL of a verified SubscriptionConfirmation."""
        url = self.check_url(str(message.get("SubscribeURL", "")), "SubscribeURL")
        timeout = aiohttp.ClientTimeout(total=self.fetch_timeout)
        async with self.session.get(url, ssl=self._ssl(), timeout=timeout) as resp:
            if resp.status != 200:
                raise WebhookRejected(502, "confirm", f"SubscribeURL answered {resp.status}")

    def _ssl(self) -> ssl.SSLContext | bool:
        return self.ssl_context if self.ssl_context is not None else True

    async def _certificate_key(self, url: str) -> rsa.RSAPublicKey:
        cached = self._cache.get(url)
        if cached is not None:
            self._cache.move_to_end(url)
            return cached
        async with self._lock:  # one fetch per URL even when a burst arrives at once
            cached = self._cache.get(url)
            if cached is not None:
                return cached
            key = await self._fetch(url)
            self._cache[url] = key
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return key

    async def _fetch(self, url: str) -> rsa.RSAPublicKey:
        timeout = aiohttp.ClientTimeout(total=self.fetch_timeout)
        try:
            async with self.session.get(
                url, ssl=self._ssl(), timeout=timeout, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    raise WebhookRejected(400, "certificate", f"certificate URL gave {resp.status}")
                pem = await resp.content.read(_MAX_CERT_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Not the sender's fault necessarily: 503 makes SNS retry later.
            message = f"signing certificate unavailable: {exc}"
            raise WebhookRejected(503, "certificate", message) from exc
        if len(pem) > _MAX_CERT_BYTES:
            raise WebhookRejected(400, "certificate", "signing certificate is too large")
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise WebhookRejected(400, "certificate", "signing certificate is not PEM") from None
        now = datetime.now(cert.not_valid_after_utc.tzinfo)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise forged("the SNS signing certificate is not valid now")
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise forged("the SNS signing certificate is not RSA")
        return key
