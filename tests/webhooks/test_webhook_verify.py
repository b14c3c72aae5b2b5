"""Signature checks and tokens as pure functions: no I/O."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from sluice.common.errors import ConfigError
from sluice.common.unsubscribe import BadToken, make_token, read_token
from sluice.ingest.settings import IngestSettings
from sluice.ingest.validation import normalize_recipient
from sluice.ingest.webhooks import sendgrid_sig, svix
from sluice.ingest.webhooks.config import from_settings
from sluice.ingest.webhooks.errors import WebhookRejected
from sluice.ingest.webhooks.parse import normalise, sendgrid_message_id
from sluice.ingest.webhooks.sns import string_to_sign

KEY = b"k" * 24
NOW = 1_800_000_000.0


def svix_headers(body: bytes, key: bytes = KEY, ts: int = int(NOW)) -> dict[str, str]:
    return {
        "svix-id": "msg_1",
        "svix-timestamp": str(ts),
        "svix-signature": svix.sign(key, "msg_1", str(ts), body),
    }


def test_svix_accepts_any_listed_signature_and_checks_time() -> None:
    body = b'{"type":"email.delivered"}'
    headers = svix_headers(body)
    rotated = svix.sign(b"o" * 24, "msg_1", str(int(NOW)), body)
    headers["svix-signature"] = f"v1,bm90IGl0 {rotated} v2,xyz {headers['svix-signature']}"
    assert svix.verify([KEY], headers, body, now=NOW, tolerance=300) == "msg_1"
    with pytest.raises(WebhookRejected) as stale:
        svix.verify([KEY], svix_headers(body, ts=int(NOW) - 301), body, now=NOW, tolerance=300)
    assert (stale.value.status, stale.value.reason) == (400, "stale")


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=199))
def test_svix_refuses_any_changed_byte(body: bytes, position: int) -> None:
    headers = svix_headers(body)
    if body:
        i = position % len(body)
        changed = body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]
    else:
        changed = b"x"
    with pytest.raises(WebhookRejected) as exc:
        svix.verify([KEY], headers, changed, now=NOW, tolerance=300)
    assert exc.value.status == 401


def test_svix_secret_format() -> None:
    assert svix.decode_secret("whsec_" + base64.b64encode(KEY).decode()) == KEY
    for bad in ("whsec_???", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError, match="secret"):
            svix.decode_secret(bad)


def test_sendgrid_signature_and_age() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    public = private.public_key()
    body = b'[{"event":"delivered"}]'
    ts = str(int(NOW))
    headers = {
        sendgrid_sig.SIGNATURE_HEADER: sendgrid_sig.sign(private, ts, body),
        sendgrid_sig.TIMESTAMP_HEADER: ts,
    }
    sendgrid_sig.verify(public, headers, body, now=NOW, tolerance=300)
    with pytest.raises(WebhookRejected, match="does not verify"):
        sendgrid_sig.verify(public, headers, body + b" ", now=NOW, tolerance=300)
    with pytest.raises(WebhookRejected, match="from now"):
        sendgrid_sig.verify(public, headers, body, now=NOW + 301, tolerance=300)
    with pytest.raises(ValueError, match="P-256"):
        sendgrid_sig.load_public_key(
            base64.b64encode(
                ec.generate_private_key(ec.SECP384R1())
                .public_key()
                .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            ).decode()
        )


def test_sns_string_to_sign_follows_the_message_type() -> None:
    base = {
        "Message": "m",
        "MessageId": "id",
        "Timestamp": "t",
        "TopicArn": "arn",
        "Type": "Notification",
    }
    assert string_to_sign(base) == (
        b"Message\nm\nMessageId\nid\nTimestamp\nt\nTopicArn\narn\nType\nNotification\n"
    )
    assert b"Subject\ns\n" in string_to_sign({**base, "Subject": "s"})
    confirm = {**base, "Type": "SubscriptionConfirmation", "SubscribeURL": "u", "Token": "k"}
    assert string_to_sign(confirm) == (
        b"Message\nm\nMessageId\nid\nSubscribeURL\nu\nTimestamp\nt\nToken\nk\n"
        b"TopicArn\narn\nType\nSubscriptionConfirmation\n"
    )


def test_sendgrid_message_id_prefix() -> None:
    assert sendgrid_message_id("14c5d75ce93.filterdrecv-p3las1-5bf99c48d-abc.0") == "14c5d75ce93"
    assert sendgrid_message_id("") is None


def test_unsubscribe_tokens() -> None:
    secret = b"s" * 32
    intent = uuid.uuid4()
    token = make_token(secret, intent, ttl=60, now=NOW)
    assert read_token(secret, token, now=NOW + 59) == intent
    with pytest.raises(BadToken, match="expired"):
        read_token(secret, token, now=NOW + 61)
    with pytest.raises(BadToken, match="signature"):
        read_token(b"t" * 32, token, now=NOW)
    hex_id, expiry, mac = token.split(".")
    with pytest.raises(BadToken, match="signature"):
        read_token(secret, f"{hex_id}.{int(expiry) + 3600}.{mac}", now=NOW)
    with pytest.raises(BadToken):
        read_token(secret, "garbage", now=NOW)


_atom = st.text(alphabet="abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=8)
_label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,6}[A-Za-z0-9])?", fullmatch=True)


@given(
    st.lists(_atom, min_size=1, max_size=3),
    st.lists(_label, min_size=1, max_size=3),
    st.sampled_from(["com", "ORG", "Example", "de"]),
)
def test_fast_address_normalisation_matches_email_validator(
    locals_: list[str], labels: list[str], tld: str
) -> None:
    address = ".".join(locals_) + "@" + ".".join([*labels, tld])
    try:
        expected = normalize_recipient(address)
    except ValueError:
        return  # not an address ingest would have stored
    assert normalise(address) == expected


def test_addresses_that_need_the_full_normalisation() -> None:
    assert normalise("José@Exämple.COM") == normalize_recipient("José@Exämple.COM")
    assert normalise("Ana <Ana@Example.COM>") == "Ana@example.com"
    assert normalise("no-at-sign") is None


def test_webhook_secrets_can_come_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "resend"
    secret.write_text("whsec_" + base64.b64encode(KEY).decode() + "\n")
    unsub = tmp_path / "unsub"
    unsub.write_text("u" * 40)
    settings = IngestSettings.from_env(
        {
            "SLUICE_RESEND_WEBHOOK_SECRET_FILE": str(secret),
            "SLUICE_UNSUBSCRIBE_SECRET_FILE": str(unsub),
        }
    )
    assert from_settings(settings).resend_keys == (KEY,)
    assert settings.unsubscribe_secret == "u" * 40
    assert "whsec_" not in repr(settings)
    with pytest.raises(ConfigError, match="SLUICE_RESEND_WEBHOOK_SECRET"):
        IngestSettings.from_env({"SLUICE_RESEND_WEBHOOK_SECRET": "whsec_!!"})
    with pytest.raises(ConfigError, match="SLUICE_SES_TOPIC_ARNS"):
        IngestSettings.from_env({"SLUICE_SES_TOPIC_ARNS": "my-topic"})
