"""SendGrid's Signed Event Webhook: ECDSA P-256 with SHA-256 over ``timestamp + body``.

The verification key SendGrid shows is base64 DER (SubjectPublicKeyInfo), not PEM. The
signature header is a base64 DER ECDSA signature. SendGrid's own helpers do not check the
timestamp's age, so a captured request could be replayed forever; here it must be within the
tolerance, and events inside it are deduplicated on ``sg_event_id``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

from sluice.ingest.webhooks.errors import forged, malformed, stale

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The key from SendGrid's base64 DER form (or a PEM block); ValueError otherwise."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = load_pem_public_key(text.encode())
        else:
            key = load_der_public_key(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error, TypeError) as exc:
        raise ValueError("the SendGrid verification key is not a base64 DER public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("the SendGrid verification key is not an ECDSA P-256 key")
    return key


def sign(private_key: ec.EllipticCurvePrivateKey, timestamp: str, body: bytes) -> str:
    """The signature header SendGrid would send (used by tests and tools)."""
    der = private_key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(der).decode()


def verify(
    key: ec.EllipticCurvePublicKey,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    tolerance: float,
) -> None:
    """Checks a signed Event Webhook request. Raises WebhookRejected."""
    signature = headers.get(SIGNATURE_HEADER, "")
    timestamp = headers.get(TIMESTAMP_HEADER, "")
    if not (signature and timestamp):
        raise forged(f"{SIGNATURE_HEADER} and {TIMESTAMP_HEADER} are required")
    try:
        sent = int(timestamp)
    except ValueError:
        raise malformed(f"{TIMESTAMP_HEADER} is not an integer") from None
    if abs(now - sent) > tolerance:
        raise stale(f"{TIMESTAMP_HEADER} is {int(now - sent)} s from now")
    try:
        der = base64.b64decode(signature, validate=True)
        key.verify(der, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        raise forged("the SendGrid signature does not verify") from None
