"""Real SMTP servers (aiosmtpd) on free loopback ports, recording what they accept.

``SmtpSink(smtputf8=False)`` announces no SMTPUTF8; ``data_reply="421 ..."`` answers every
DATA with that line; recipients starting ``reject`` get 550, ``busy`` 451 and ``later``
450 at RCPT; ``hang_data`` holds DATA unanswered (the client times out after sending);
``tls_context`` offers STARTTLS (and requires it before AUTH), ``credentials`` requires AUTH.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    smtputf8: bool

    @property
    def message(self) -> Message:
        return message_from_bytes(self.content)


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.startswith("reject"):
            return f"550 5.1.1 <{address}>: No such user"  # servers echo the address
        if address.startswith("busy"):
            return "451 4.7.1 Slow down"
        if address.startswith("later"):
            return "450 4.2.0 Mailbox busy"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.hang_data:
            await asyncio.sleep(self.sink.hang_seconds)
        self.sink.received.append(
            Received(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                content=bytes(envelope.original_content or b""),
                smtputf8=envelope.smtp_utf8,
            )
        )
        return self.sink.data_reply or "250 OK queued"


class SmtpSink:
    def __init__(
        self,
        *,
        smtputf8: bool = True,
        data_reply: str = "",
        tls_context: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.smtputf8 = smtputf8
        self.data_reply = data_reply
        self.hang_data = False
        self.hang_seconds = 5.0
        self.tls_context = tls_context
        self.credentials = credentials
        self.received: list[Received] = []
        self.connections = 0
        self._protocols: list[SMTP] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and self.credentials == (
            data.login.decode(),
            data.password.decode(),
        )
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535

    def _protocol(self) -> SMTP:
        self.connections += 1
        protocol = SMTP(
            _Handler(self),
            enable_SMTPUTF8=self.smtputf8,
            hostname="sink.test",
            tls_context=self.tls_context,
            require_starttls=self.tls_context is not None,
            auth_required=self.credentials is not None,
            auth_require_tls=self.tls_context is not None,
            authenticator=self._authenticate if self.credentials else None,
        )
        self._protocols.append(protocol)
        return protocol

    async def __aenter__(self) -> SmtpSink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for protocol in self._protocols:
            if protocol.transport is not None:
                protocol.transport.close()
        await self._server.wait_closed()


def self_signed(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for 127.0.0.1 and the CA file a client trusts it with."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file = directory / "cert.pem"
    key_file = directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file
