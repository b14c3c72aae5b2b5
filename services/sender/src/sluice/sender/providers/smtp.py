"""The SMTP adapter (``kind = "smtp"``), through aiosmtplib and a small connection pool.

Each message is one SMTP transaction (MAIL, RCPT, DATA) on a pooled connection, up to
``pool_size`` at once. The transaction is driven step by step so the adapter knows
whether the message was handed over: a connection lost before DATA is retried once on a
fresh connection (nothing was sent), a fresh connection that cannot be made means
``unavailable``, and a connection lost or timed out during DATA means ``unknown``.
Every attempt at one intent carries the same ``Message-ID``, which is also the
provider message id.

Answer -> outcome (the README has the table): 250 accepted; 421 and 451 throttled (the
server asks to slow down; 421 also closes the connection); other 4xx transient; 5xx
permanent; a recipient or sender that needs SMTPUTF8 on a server that does not announce
it permanent; a header with a line break permanent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiosmtplib

from sluice.common.errors import ConfigError, Unavailable
from sluice.common.providers import ProviderConfig, SmtpSettings
from sluice.sender.providers import mime
from sluice.sender.providers.base import (
    EmailProvider,
    OutboundEmail,
    Plan,
    ProviderResult,
    consecutive,
    planned,
    provider_text,
    send_in_chunks,
)

THROTTLE_CODES = (421, 451)
THROTTLE_WAIT = 30.0
_LOST = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, ConnectionError)


class SmtpPool:
    """At most ``pool_size`` connections to one relay, opened on demand and reused."""

    def __init__(self, settings: SmtpSettings, password: str | None = None) -> None:
        self.settings = settings
        self._password = password
        self._idle: list[aiosmtplib.SMTP] = []
        self._gate = asyncio.Semaphore(settings.pool_size)

    @contextlib.asynccontextmanager
    async def connection(self, *, fresh: bool = False) -> AsyncIterator[aiosmtplib.SMTP]:
        """A connected (and authenticated) client; broken ones are not given back."""
        async with self._gate:
            conn = None
            while self._idle and conn is None:
                candidate = self._idle.pop()
                if fresh or not candidate.is_connected:
                    await _close(candidate)
                else:
                    conn = candidate
            if conn is None:
                conn = await self._connect()
            healthy = False
            try:
                yield conn
                healthy = conn.is_connected
            finally:
                if healthy:
                    self._idle.append(conn)
                else:
                    await _close(conn)

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self.settings
        conn = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            use_tls=s.tls == "implicit",
            start_tls=s.tls == "starttls",
            validate_certs=s.validate_certs,
            cert_bundle=s.ca_file or None,
            timeout=s.timeout_seconds,
            local_hostname=s.local_hostname or None,
        )
        try:
            await conn.connect()
            if conn.last_ehlo_response is None:  # extensions (SMTPUTF8) are read from EHLO
                await conn.ehlo()
            if s.username and self._password is not None:
                await conn.login(s.username, self._password)
        except (aiosmtplib.SMTPException, OSError) as exc:
            await _close(conn)
            raise Unavailable(f"smtp {s.host}:{s.port}: {type(exc).__name__}: {exc}") from exc
        return conn

    async def aclose(self) -> None:
        """Says QUIT on every idle connection."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await _close(conn)


async def _close(conn: aiosmtplib.SMTP) -> None:
    if conn.is_connected:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await asyncio.wait_for(conn.quit(), 2)
    conn.close()


class SmtpProvider:
    """An ``EmailProvider`` for an SMTP relay, given its ``SmtpPool``."""

    def __init__(self, name: str, pool: SmtpPool) -> None:
        self._name = name
        self._pool = pool

    @property
    def name(self) -> str:
        """The configured provider name."""
        return self._name

    @property
    def largest_request(self) -> int:
        """One message a call."""
        return 1

    def plan(self, messages: Sequence[OutboundEmail]) -> Plan:
        """One transaction per message."""
        return consecutive(len(messages), 1)

    async def send_batch(self, messages: Sequence[OutboundEmail]) -> list[ProviderResult]:
        """One transaction per message, ``pool_size`` at a time."""
        return await send_in_chunks(
            planned(messages, self.plan(messages)),
            self._send_chunk,
            concurrency=self._pool.settings.pool_size,
        )

    async def _send_chunk(self, chunk: Sequence[OutboundEmail]) -> list[ProviderResult]:
        return [await self._send(chunk[0])]

    async def _send(self, message: OutboundEmail) -> ProviderResult:
        try:
            raw = mime.build(message, message_id_domain=self._pool.settings.message_id_domain)
        except ValueError as exc:
            return ProviderResult(message.intent_id, "permanent", reason=f"message: {exc}")
        mid = str(raw["Message-ID"]).strip("<>")
        utf8 = mime.needs_smtputf8(message)
        data = raw.as_bytes()
        for fresh in (False, True):
            try:
                return await self._transaction(message, mid, data, utf8, fresh=fresh)
            except _NotHandedOver:
                if fresh:
                    raise Unavailable(f"smtp {self._pool.settings.host}: connection lost") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _transaction(
        self, message: OutboundEmail, mid: str, data: bytes, utf8: bool, *, fresh: bool
    ) -> ProviderResult:
        sender, recipient = mime.envelope(message)
        async with self._pool.connection(fresh=fresh) as conn:
            if utf8 and not conn.supports_extension("smtputf8"):
                return ProviderResult(
                    message.intent_id,
                    "permanent",
                    reason="address needs SMTPUTF8, which the server does not announce",
                )
            options = ["SMTPUTF8"] if utf8 else []
            if utf8 and conn.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
            try:
                await conn.mail(sender, options=options, encoding="utf-8" if utf8 else "ascii")
                await conn.rcpt(recipient, encoding="utf-8" if utf8 else "ascii")
            except aiosmtplib.SMTPResponseException as exc:
                await _reset(conn, exc.code)
                return _refused(message, exc.code, exc.message)
            except _LOST as exc:
                raise _NotHandedOver from exc
            try:
                await conn.data(data)
            except aiosmtplib.SMTPResponseException as exc:
                await _reset(conn, exc.code)
                return _refused(message, exc.code, exc.message)
            except _LOST as exc:
                conn.close()
                return ProviderResult(
                    message.intent_id, "unknown", reason=f"smtp: lost during DATA: {exc}"
                )
        return ProviderResult(message.intent_id, "accepted", provider_message_id=mid)


class _NotHandedOver(Exception):
    """The connection failed before DATA: nothing of the message was sent."""


async def _reset(conn: aiosmtplib.SMTP, code: int) -> None:
    if code == 421:  # the server is closing this connection
        conn.close()
        return
    try:
        await conn.rset()
    except (aiosmtplib.SMTPException, OSError):
        conn.close()


def _refused(message: OutboundEmail, code: int, text: str) -> ProviderResult:
    reason = f"smtp {code}: {provider_text(text)}"
    if code in THROTTLE_CODES:
        return ProviderResult(
            message.intent_id, "throttled", reason=reason, retry_after=THROTTLE_WAIT
        )
    if 400 <= code < 500:
        return ProviderResult(message.intent_id, "transient", reason=reason)
    return ProviderResult(message.intent_id, "permanent", reason=reason)


async def open_adapter(
    config: ProviderConfig, stack: contextlib.AsyncExitStack, resources: Any
) -> EmailProvider:
    """Factory: the connection pool (closed with ``stack``), password resolved now."""
    settings = config.settings
    if not isinstance(settings, SmtpSettings):
        raise ConfigError(f"provider {config.name!r}: not an smtp provider")
    password = (
        settings.password.reveal(resources.environ, f"provider {config.name!r}: password")
        if settings.password is not None
        else None
    )
    pool = SmtpPool(settings, password)
    stack.push_async_callback(pool.aclose)
    return SmtpProvider(config.name, pool)
