"""Test keys and certificates made at run time, and signing as each provider signs.

Nothing here is a real key. The SNS signing certificate is served by a local HTTPS server
(:class:`CertServer`) whose own TLS certificate comes from a throwaway CA the test trusts.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import ssl
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from sluice.ingest.webhooks import sendgrid_sig, svix
from sluice.ingest.webhooks.sns import string_to_sign

TOPIC = "arn:aws:sns:eu-west-1:123456789012:sluice-ses-events"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: str,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool = False,
    san: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class ProviderKeys:
    """One set of keys for all three providers."""

    svix_secret_key: bytes = field(default_factory=lambda: os.urandom(24))
    sendgrid_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    sns_key: rsa.RSAPrivateKey = field(default_factory=_rsa)
    ca_key: rsa.RSAPrivateKey = field(default_factory=_rsa)
    tls_key: rsa.RSAPrivateKey = field(default_factory=_rsa)

    def __post_init__(self) -> None:
        self.ca_cert = _cert("Test CA", self.ca_key, "Test CA", self.ca_key, ca=True)
        self.tls_cert = _cert("localhost", self.tls_key, "Test CA", self.ca_key, san=True)
        self.sns_cert = _cert("sns.test", self.sns_key, "Test CA", self.ca_key)

    @property
    def svix_secret(self) -> str:
        return "whsec_" + base64.b64encode(self.svix_secret_key).decode()

    @property
    def sendgrid_public(self) -> str:
        der = self.sendgrid_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    def client_ssl(self) -> ssl.SSLContext:
        """An SSL context that trusts only the test CA."""
        return ssl.create_default_context(
            cadata=self.ca_cert.public_bytes(serialization.Encoding.PEM).decode()
        )

    def server_ssl(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as tmp:
            cert = Path(tmp) / "cert.pem"
            key = Path(tmp) / "key.pem"
            cert.write_bytes(self.tls_cert.public_bytes(serialization.Encoding.PEM))
            key.write_bytes(
                self.tls_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            ctx.load_cert_chain(cert, key)
        return ctx

    # ---- signing -----------------------------------------------------------------------------

    def resend_headers(
        self, body: bytes, *, msg_id: str | None = None, timestamp: int | None = None
    ) -> dict[str, str]:
        msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
        ts = str(int(dt.datetime.now(dt.UTC).timestamp()) if timestamp is None else timestamp)
        return {
            "svix-id": msg_id,
            "svix-timestamp": ts,
            "svix-signature": svix.sign(self.svix_secret_key, msg_id, ts, body),
            "content-type": "application/json",
        }

    def sendgrid_headers(self, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
        ts = str(int(dt.datetime.now(dt.UTC).timestamp()) if timestamp is None else timestamp)
        return {
            sendgrid_sig.SIGNATURE_HEADER: sendgrid_sig.sign(self.sendgrid_key, ts, body),
            sendgrid_sig.TIMESTAMP_HEADER: ts,
            "content-type": "application/json",
        }

    def sns_message(
        self,
        cert_url: str,
        ses_event: dict[str, Any] | None = None,
        *,
        kind: str = "Notification",
        version: str = "2",
        topic: str = TOPIC,
        message_id: str | None = None,
        timestamp: dt.datetime | None = None,
        subscribe_url: str = "",
    ) -> dict[str, Any]:
        when = timestamp or dt.datetime.now(dt.UTC)
        message: dict[str, Any] = {
            "Type": kind,
            "MessageId": message_id or str(uuid.uuid4()),
            "TopicArn": topic,
            "Message": json.dumps(ses_event) if ses_event is not None else "confirm",
            "Timestamp": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
            "SignatureVersion": version,
            "SigningCertURL": cert_url,
        }
        if kind != "Notification":
            message["Token"] = uuid.uuid4().hex
            message["SubscribeURL"] = subscribe_url
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = self.sns_key.sign(string_to_sign(message), padding.PKCS1v15(), algorithm)
        message["Signature"] = base64.b64encode(signature).decode()
        return message


class CertServer:
    """A local HTTPS server standing in for SNS: serves the signing certificate and counts
    visits to the subscription URL."""

    def __init__(self, keys: ProviderKeys) -> None:
        self.keys = keys
        self.cert_fetches = 0
        self.confirmations = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _cert(self, request: web.Request) -> web.Response:
        self.cert_fetches += 1
        return web.Response(body=self.keys.sns_cert.public_bytes(serialization.Encoding.PEM))

    async def _confirm(self, request: web.Request) -> web.Response:
        self.confirmations += 1
        return web.Response(text="<ConfirmSubscriptionResponse/>")

    async def __aenter__(self) -> CertServer:
        app = web.Application()
        app.router.add_get("/SimpleNotificationService-test.pem", self._cert)
        app.router.add_get("/confirm", self._confirm)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.keys.server_ssl())
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def cert_url(self) -> str:
        return f"https://localhost:{self.port}/SimpleNotificationService-test.pem"

    @property
    def subscribe_url(self) -> str:
        return f"https://localhost:{self.port}/confirm"
