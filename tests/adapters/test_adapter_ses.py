"""The SES adapter through aioboto3: against moto's server (what SES accepts and
records) and against a loopback server answering SES's error shapes."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import email as stdlib_email
import logging
import socket
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from sluice.common.errors import Unavailable
from sluice.common.providers import ProviderConfig, Secret, SesSettings
from sluice.sender.providers import account_limits, build_adapters
from sluice.sender.providers.base import INTENT_TAG
from sluice.sender.providers.ses import SesProvider
from tests.adapters.messages import email
from tests.fakes.ses_fake import REGION, FakeSesErrors, moto_sent_messages, moto_server


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


def settings(url: str, **extra: object) -> SesSettings:
    return SesSettings(
        region=REGION,
        endpoint_url=url,
        access_key_id=Secret("value", "testing"),
        secret_access_key=Secret("value", "testing"),
        **extra,  # type: ignore[arg-type]
    )


def config(url: str, **extra: object) -> ProviderConfig:
    return ProviderConfig(
        name="ses",
        kind="ses",
        cost_per_thousand=0.1,
        sustained_rate=14,
        burst=30,
        intents=frozenset({"marketing"}),
        settings=settings(url, **extra),
    )


@contextlib.asynccontextmanager
async def adapter(url: str, **extra: object) -> AsyncIterator[SesProvider]:
    async with contextlib.AsyncExitStack() as stack:
        adapters = await build_adapters(
            [config(url, **extra)],
            stack,
            redis=None,
            prefix="p",
            environ={},  # type: ignore[arg-type]
        )
        provider = adapters["ses"]
        assert isinstance(provider, SesProvider)
        yield provider


async def _moto_reset_and_verify(url: str, identity: str) -> None:
    async with httpx.AsyncClient() as client:
        (await client.post(f"{url}/moto-api/reset")).raise_for_status()
    async with adapter(url) as provider:
        await provider._client.create_email_identity(EmailIdentity=identity)


async def test_sends_raw_mime_that_moto_records(moto_url: str) -> None:
    await _moto_reset_and_verify(moto_url, "sluice.test")
    messages = [
        email(
            f"i{n}",
            f"r{n}@example.com",
            reply_to="help@sluice.test",
            list_unsubscribe_url="https://sluice.test/u/1",
            headers=(("X-Campaign", "w"),),
        )
        for n in range(3)
    ]
    async with adapter(moto_url, configuration_set="events") as provider:
        results = await provider.send_batch(messages)
    assert [r.outcome for r in results] == ["accepted"] * 3
    sent = moto_sent_messages()
    assert {r.provider_message_id for r in results} == {m.id for m in sent}
    by_rcpt = {m.destinations[0]: stdlib_email.message_from_string(m.raw_data) for m in sent}
    mime = by_rcpt["r1@example.com"]
    assert mime["Subject"] == "Hello"
    assert mime["Reply-To"] == "help@sluice.test"
    assert mime["List-Unsubscribe"] == "<https://sluice.test/u/1>"
    assert mime["X-Campaign"] == "w"
    assert mime["Message-ID"] == "<i1@sluice.test>"


async def test_unverified_sender_is_permanent(moto_url: str) -> None:
    await _moto_reset_and_verify(moto_url, "other.test")
    async with adapter(moto_url) as provider:
        [result] = await provider.send_batch([email("a")])
    assert result.outcome == "permanent"
    assert result.reason.startswith("ses MessageRejected")
    assert moto_sent_messages() == []


@pytest.fixture
async def errors() -> AsyncIterator[FakeSesErrors]:
    async with FakeSesErrors() as server:
        yield server


async def test_tags_and_configuration_set_on_the_wire(errors: FakeSesErrors) -> None:
    async with adapter(errors.url, configuration_set="events") as provider:
        [result] = await provider.send_batch([email("i-1", tags=(("campaign", "w s"),))])
    assert result.outcome == "accepted"
    body = errors.requests[0]["body"]
    assert body["ConfigurationSetName"] == "events"
    assert {"Name": INTENT_TAG, "Value": "i-1"} in body["EmailTags"]
    assert {"Name": "campaign", "Value": "w_s"} in body["EmailTags"]
    assert body["Destination"] == {"ToAddresses": ["ada@example.com"]}
    raw = base64.b64decode(body["Content"]["Raw"]["Data"])
    assert b"Message-ID: <i-1@sluice.test>" in raw


async def test_error_answers_map_to_outcomes(errors: FakeSesErrors) -> None:
    errors.answers = [
        (400, "ThrottlingException", "Maximum sending rate exceeded."),
        (400, "ThrottlingException", "Daily message quota exceeded."),
        (400, "MessageRejected", "Email address is not verified."),
        (400, "BadRequestException", "Invalid tag"),
        (400, "SendingPausedException", "Sending is paused for this account"),
        (500, "InternalFailure", "oops"),
        (400, "MailFromDomainNotVerifiedException", "MAIL FROM domain is not verified"),
    ]
    async with adapter(errors.url, max_connections=1) as provider:
        results = [(await provider.send_batch([email(str(n))]))[0] for n in range(7)]
    assert [r.outcome for r in results] == [
        "throttled",
        "throttled",
        "permanent",
        "permanent",
        "unavailable",
        "transient",
        "unavailable",
    ]
    assert results[0].retry_after == 1.0
    assert results[1].reason.startswith("quota exhausted; paused_until=")
    assert results[1].retry_after == pytest.approx(3600, abs=1)
    assert results[1].quota
    assert not results[0].quota


async def test_timeout_is_unknown_and_no_endpoint_is_unavailable(errors: FakeSesErrors) -> None:
    errors.hold_next, errors.hold_seconds = 1, 6.0
    async with adapter(errors.url, timeout_seconds=2.0) as provider:
        [result] = await provider.send_batch([email("a")])
    assert result.outcome == "unknown"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with adapter(url, timeout_seconds=2.0) as provider:
        with pytest.raises(Unavailable):
            await provider.send_batch([email("b")])


async def test_read_quota_lowers_the_limits_to_the_account_and_never_raises_them(
    errors: FakeSesErrors, caplog: pytest.LogCaptureFixture
) -> None:
    # moto (5.x) answers SES v2's GetAccount with 404, so the error-shape server answers it.
    errors.quota = {"Max24HourSend": 200.0, "MaxSendRate": 5.0, "SentLast24Hours": 10.0}
    above = config(errors.url, read_quota=True)  # sustained_rate 14, burst 30, no quota
    below = dataclasses.replace(above, sustained_rate=3, burst=3, daily_quota=100)
    off = config(errors.url)
    seeded: list[ProviderConfig] = []
    async with contextlib.AsyncExitStack() as stack:
        for c in (above, below, off):
            adapters = await build_adapters(
                [c],
                stack,
                redis=None,  # type: ignore[arg-type]
                prefix="p",
                environ={},
            )
            with caplog.at_level(logging.INFO, logger="sluice.sender.ses"):
                seeded.append((await account_limits([c], adapters))[c.name])
    lowered, kept, untouched = seeded
    assert (lowered.sustained_rate, lowered.burst, lowered.daily_quota) == (5.0, 30, 200)
    assert (kept.sustained_rate, kept.burst, kept.daily_quota) == (3, 3, 100)
    assert untouched == off
    assert errors.account_reads == 2  # read_quota off reads nothing
    first, second = caplog.records
    assert first.levelno == logging.WARNING  # lower than configured: say so
    assert (first.sustained_rate, first.sustained_rate_from) == (5.0, "account MaxSendRate")  # type: ignore[attr-defined]
    assert (first.daily_quota, first.daily_quota_from) == (200, "account Max24HourSend")  # type: ignore[attr-defined]
    assert second.levelno == logging.INFO
    assert second.sustained_rate_from == second.daily_quota_from == "configuration"  # type: ignore[attr-defined]
    assert "testing" not in repr(vars(first))  # the credentials never reach the log


async def test_send_quota_is_read(errors: FakeSesErrors) -> None:
    async with adapter(errors.url, read_quota=True) as provider:
        quota = await provider.send_quota()
    assert (quota.max_send_rate, quota.max_24_hour_send) == (14.0, 50000.0)
    assert quota.sent_last_24_hours == 10.0
