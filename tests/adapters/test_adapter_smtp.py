"""The SMTP adapter against real aiosmtpd servers on loopback."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sluice.common.errors import Unavailable
from sluice.common.providers import ProviderConfig, Secret, SmtpSettings
from sluice.sender.providers import build_adapters
from sluice.sender.providers.smtp import SmtpPool, SmtpProvider
from tests.adapters.messages import email
from tests.fakes.smtp_fake import SmtpSink, self_signed


@contextlib.asynccontextmanager
async def adapter(
    port: int, secret: str | None = None, **settings: Any
) -> AsyncIterator[SmtpProvider]:
    settings.setdefault("tls", "none")
    pool = SmtpPool(SmtpSettings(host="127.0.0.1", port=port, **settings), secret)
    try:
        yield SmtpProvider("smtp", pool)
    finally:
        await pool.aclose()


async def test_sends_with_headers_and_a_stable_message_id_over_a_pool() -> None:
    async with SmtpSink() as sink, adapter(sink.port, pool_size=2) as provider:
        messages = [
            email(
                f"i{n}",
                f"r{n}@example.com",
                reply_to="help@sluice.test",
                headers=(("X-Campaign", "winter"),),
                list_unsubscribe_url="https://sluice.test/u/1",
            )
            for n in range(6)
        ]
        results = await provider.send_batch(messages)
        [again] = await provider.send_batch([messages[0]])
    assert [r.outcome for r in results] == ["accepted"] * 6
    assert results[0].provider_message_id == "i0@sluice.test"
    assert again.provider_message_id == results[0].provider_message_id
    assert sink.connections <= 2  # pooled and reused
    by_rcpt = {r.rcpt_tos[0]: r.message for r in sink.received}
    m = by_rcpt["r3@example.com"]
    assert m["Message-ID"] == "<i3@sluice.test>"
    assert m["Reply-To"] == "help@sluice.test"
    assert m["X-Campaign"] == "winter"
    assert m["List-Unsubscribe"] == "<https://sluice.test/u/1>"
    assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert m.get_content_type() == "multipart/alternative"
    assert sink.received[0].mail_from == "noreply@sluice.test"


async def test_sluice_unsubscribe_replaces_a_message_own_list_unsubscribe() -> None:
    # A client may set List-Unsubscribe; when Sluice has its own link for the message, two
    # List-Unsubscribe headers would leave the mailbox guessing, so Sluice's is the one sent.
    own = (("list-unsubscribe", "<mailto:stop@example.com>"), ("X-Campaign", "w"))
    async with SmtpSink() as sink, adapter(sink.port) as provider:
        await provider.send_batch(
            [
                email("a", headers=own, list_unsubscribe_url="https://sluice.test/u/a"),
                email("b", headers=own),
            ]
        )
    sent = {r.message["Message-ID"]: r.message for r in sink.received}
    with_link, without = sent["<a@sluice.test>"], sent["<b@sluice.test>"]
    assert with_link.get_all("List-Unsubscribe") == ["<https://sluice.test/u/a>"]
    assert with_link["X-Campaign"] == "w"
    assert without.get_all("List-Unsubscribe") == ["<mailto:stop@example.com>"]


async def test_recipient_answers_map_to_outcomes() -> None:
    async with SmtpSink() as sink, adapter(sink.port) as provider:
        results = await provider.send_batch(
            [
                email("a", "reject@example.com"),
                email("b", "busy@example.com"),
                email("c", "later@example.com"),
                email("d", "fine@example.com"),
            ]
        )
    assert [r.outcome for r in results] == ["permanent", "throttled", "transient", "accepted"]
    assert results[0].reason.startswith("smtp 550")
    # Reasons are logged: the address the server echoed is redacted.
    assert "reject@example.com" not in results[0].reason
    assert "@example.com" in results[0].reason
    assert results[1].retry_after > 0
    assert [r.rcpt_tos for r in sink.received] == [["fine@example.com"]]


async def test_421_at_data_is_throttled() -> None:
    async with (
        SmtpSink(data_reply="421 4.7.0 Too many messages") as sink,
        adapter(sink.port) as provider,
    ):
        [result] = await provider.send_batch([email("a")])
    assert (result.outcome, result.reason[:8]) == ("throttled", "smtp 421")


async def test_smtputf8_only_where_announced() -> None:
    utf8 = email("u", "jörg@exämple.com")
    idn = email("i", "ada@exämple.com")
    async with SmtpSink(smtputf8=False) as sink, adapter(sink.port) as provider:
        results = await provider.send_batch([utf8, idn])
    assert results[0].outcome == "permanent"
    assert "SMTPUTF8" in results[0].reason
    assert results[1].outcome == "accepted"  # only the domain is not ASCII: IDNA
    assert [r.rcpt_tos for r in sink.received] == [["ada@xn--exmple-cua.com"]]
    async with SmtpSink(smtputf8=True) as sink, adapter(sink.port) as provider:
        [result] = await provider.send_batch([utf8])
    assert result.outcome == "accepted"
    assert sink.received[0].smtputf8 is True
    assert sink.received[0].rcpt_tos == ["jörg@xn--exmple-cua.com"]


async def test_header_injection_is_refused_before_the_wire() -> None:
    async with SmtpSink() as sink, adapter(sink.port) as provider:
        [result] = await provider.send_batch([email("a", subject="Hi\r\nBcc: x@evil.test")])
    assert result.outcome == "permanent"
    assert sink.received == []


async def test_timeout_during_data_is_unknown() -> None:
    async with SmtpSink() as sink:
        sink.hang_data, sink.hang_seconds = True, 6.0
        async with adapter(sink.port, timeout_seconds=2.0) as provider:
            [result] = await provider.send_batch([email("a")])
    assert result.outcome == "unknown"


async def test_no_server_is_unavailable_and_a_dropped_idle_connection_is_replaced() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with adapter(port) as provider:
        with pytest.raises(Unavailable):
            await provider.send_batch([email("a"), email("b")])
    async with SmtpSink() as sink, adapter(sink.port) as provider:
        assert (await provider.send_batch([email("a")]))[0].outcome == "accepted"
        for protocol in sink._protocols:  # the server drops the idle pooled connection
            assert protocol.transport is not None
            protocol.transport.close()
        assert (await provider.send_batch([email("b")]))[0].outcome == "accepted"
    assert len(sink.received) == 2


async def test_starttls_and_auth(tmp_path: Path) -> None:
    context, ca_file = self_signed(tmp_path)
    async with SmtpSink(tls_context=context, credentials=("user", "s3cret")) as sink:
        async with adapter(
            sink.port,
            "s3cret",
            tls="starttls",
            username="user",
            password=Secret("value", "s3cret"),
            ca_file=str(ca_file),
        ) as provider:
            [ok] = await provider.send_batch([email("a")])
        async with adapter(
            sink.port,
            "wrong",
            tls="starttls",
            username="user",
            password=Secret("value", "wrong"),
            ca_file=str(ca_file),
        ) as provider:
            with pytest.raises(Unavailable, match="SMTPAuthenticationError"):
                await provider.send_batch([email("b")])
    assert ok.outcome == "accepted"
    assert len(sink.received) == 1


async def test_registry_builds_it_with_the_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    context, ca_file = self_signed(tmp_path)
    async with SmtpSink(tls_context=context, credentials=("user", "s3cret")) as sink:
        config = ProviderConfig(
            name="relay",
            kind="smtp",
            cost_per_thousand=0,
            sustained_rate=0,
            burst=0,
            intents=frozenset({"transactional"}),
            settings=SmtpSettings(
                host="127.0.0.1",
                port=sink.port,
                tls="starttls",
                username="user",
                password=Secret("file", str(secret)),
                ca_file=str(ca_file),
            ),
        )
        async with contextlib.AsyncExitStack() as stack:
            adapters = await build_adapters(
                [config],
                stack,
                redis=None,
                prefix="p",
                environ={},  # type: ignore[arg-type]
            )
            [result] = await adapters["relay"].send_batch([email("a")])
    assert result.outcome == "accepted"
