"""The SendGrid adapter against the local SendGrid fake, over real HTTP on loopback."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from sluice.common.errors import Unavailable
from sluice.common.providers import Secret, SendGridSettings
from sluice.sender.providers.base import INTENT_TAG, Announced
from sluice.sender.providers.sendgrid import SendGridProvider, announced, pack
from tests.adapters.messages import email
from tests.fakes.sendgrid_fake import FakeSendGrid

KEY = "SG.test-key"


@pytest.fixture
async def fake() -> AsyncIterator[FakeSendGrid]:
    async with FakeSendGrid(api_key=KEY) as server:
        yield server


@contextlib.asynccontextmanager
async def adapter(
    url: str, *, key: str = KEY, wait: float = 5.0
) -> AsyncIterator[SendGridProvider]:
    settings = SendGridSettings(api_key=Secret("value", key), base_url=url, timeout_seconds=wait)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=wait
    ) as client:
        yield SendGridProvider("sendgrid", settings, client)


def body(n: int = 1, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "personalizations": [
            {"to": [{"email": f"r{i}@example.com"}], "subject": "s"} for i in range(n)
        ],
        "from": {"email": "noreply@sluice.test"},
        "content": [{"type": "text/plain", "value": "t"}, {"type": "text/html", "value": "h"}],
    }
    doc.update(overrides)
    return doc


async def test_fake_refuses_what_sendgrid_refuses(fake: FakeSendGrid) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    dup = body(2)
    dup["personalizations"][1]["to"] = [{"email": "R0@example.com"}]
    no_subject = body(1)
    del no_subject["personalizations"][0]["subject"]
    html_first = body(
        1, content=[{"type": "text/html", "value": "h"}, {"type": "text/plain", "value": "t"}]
    )
    bad_args = body(1)
    bad_args["personalizations"][0]["custom_args"] = {"n": 1}
    reserved = body(1)
    reserved["personalizations"][0]["headers"] = {"Received": "x"}
    async with httpx.AsyncClient(base_url=fake.url) as client:
        assert (await client.post("/v3/mail/send", json=body())).status_code == 401
        for refused, field in [
            (body(1001), "personalizations"),
            (dup, "personalizations.1.to"),
            (no_subject, "subject"),
            (html_first, "content"),
            (bad_args, "personalizations.0.custom_args"),
            (reserved, "personalizations.0.headers"),
            (body(1, personalizations=[]), "personalizations"),
        ]:
            r = await client.post("/v3/mail/send", json=refused, headers=auth)
            assert r.status_code == 400, field
            assert r.json()["errors"][0]["field"] == field
        ok = await client.post("/v3/mail/send", json=body(3), headers=auth)
        assert ok.status_code == 202
        assert ok.content == b""
        assert ok.headers["X-Message-Id"]
    assert len(fake.messages) == 3


def test_packing_by_content_limit_and_unique_recipients() -> None:
    same = [email(f"i{n}", f"r{n}@example.com") for n in range(2500)]
    assert [len(r) for r in pack(same)] == [1000, 1000, 500]
    mixed = [
        email("a", html="<p>1</p>"),
        email("b", "x@example.com", html="<p>2</p>"),
        email("c", "y@example.com", html="<p>1</p>"),
    ]
    assert pack(mixed) == [[0, 2], [1]]
    twice = [email("a", "same@example.com"), email("b", "SAME@example.com")]
    assert [len(r) for r in pack(twice)] == [1, 1]


async def test_one_request_of_personalizations_with_custom_args(fake: FakeSendGrid) -> None:
    messages = [
        email(
            f"i{n}",
            f"r{n}@example.com",
            subject=f"Hi {n}",
            tags=(("campaign", "w"),),
            list_unsubscribe_url="https://sluice.test/u/1",
            reply_to="help@sluice.test",
        )
        for n in range(5)
    ] + [email("other", "z@example.com", html="<p>different</p>")]
    async with adapter(fake.url) as provider:
        results = await provider.send_batch(messages)
    assert [r.intent_id for r in results] == [m.intent_id for m in messages]
    assert {r.outcome for r in results} == {"accepted"}
    assert len(fake.requests) == 2
    assert len({r.provider_message_id for r in results[:5]}) == 1
    assert results[5].provider_message_id != results[0].provider_message_id
    sizes = sorted(len(json.loads(r["body"])["personalizations"]) for r in fake.requests)
    assert sizes == [1, 5]
    by_intent = {m["custom_args"][INTENT_TAG]: m for m in fake.messages}
    assert set(by_intent) == {m.intent_id for m in messages}
    assert by_intent["i3"]["subject"] == "Hi 3"
    assert by_intent["i3"]["to"] == ["r3@example.com"]
    assert by_intent["i3"]["custom_args"]["campaign"] == "w"
    assert by_intent["i3"]["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert by_intent["i3"]["reply_to"] == {"email": "help@sluice.test"}
    assert by_intent["i3"]["from"] == "noreply@sluice.test"


async def test_a_bad_message_does_not_fail_its_request(fake: FakeSendGrid) -> None:
    messages = [
        email("a", "a@example.com"),
        email("b", "not-an-address"),
        email("c", "c@example.com"),
    ]
    async with adapter(fake.url) as provider:
        results = await provider.send_batch(messages)
    assert [r.outcome for r in results] == ["accepted", "permanent", "accepted"]
    assert "valid address" in results[1].reason
    assert {m["to"][0] for m in fake.messages} == {"a@example.com", "c@example.com"}


async def test_rate_limited_is_throttled_until_the_reset() -> None:
    async with FakeSendGrid(api_key=KEY, requests_per_second=1) as fake, adapter(fake.url) as p:
        results = await p.send_batch([email("a", html="<p>1</p>"), email("b", html="<p>2</p>")])
    assert sorted(r.outcome for r in results) == ["accepted", "throttled"]
    throttled = next(r for r in results if r.outcome == "throttled")
    assert 0 < throttled.retry_after <= 3


async def test_an_answer_with_nothing_remaining_announces_the_reset() -> None:
    async with FakeSendGrid(api_key=KEY, requests_per_second=1) as fake, adapter(fake.url) as p:
        results = [(await p.send_batch([email(str(n))]))[0] for n in range(3)]
    # One a second: every answer, accepted or refused, leaves nothing in its window and
    # says to wait for the reset, at most a second away. No rate: SendGrid does not say
    # how long its window is.
    assert results[0].outcome == "accepted"
    for r in results:
        assert r.announced is not None
        assert 0 < r.announced.reset_after <= 1.05
        assert r.announced.requests_per_second == 0


def test_sendgrid_headers_are_read_as_documented() -> None:
    def read(remaining: str, reset: float) -> Announced | None:
        return announced(
            httpx.Headers(
                {
                    "X-RateLimit-Limit": "600",
                    "X-RateLimit-Remaining": remaining,
                    "X-RateLimit-Reset": str(int(reset)),
                }
            )
        )

    now = time.time()
    assert read("599", now + 30) is None
    later = read("0", now + 30)
    assert later is not None
    assert 28 < later.reset_after <= 30
    assert read("0", now - 5) is None  # already reset
    assert read("0", now + 86400) == Announced(reset_after=3600)  # bounded
    assert announced(httpx.Headers({"X-RateLimit-Remaining": "0"})) is None


async def test_failures_map_to_outcomes(fake: FakeSendGrid) -> None:
    async with adapter(fake.url, wait=2.0) as provider:
        fake.status_next = [500, 502, 413]
        assert (await provider.send_batch([email("a")]))[0].outcome == "transient"
        assert (await provider.send_batch([email("b")]))[0].outcome == "unknown"
        assert (await provider.send_batch([email("c")]))[0].outcome == "permanent"
        fake.hold_next, fake.hold_seconds = 1, 6.0
        assert (await provider.send_batch([email("d")]))[0].outcome == "unknown"
        fake.cut_next = 1
        assert (await provider.send_batch([email("e")]))[0].outcome == "unknown"
    async with adapter(fake.url, key="wrong") as provider:
        [denied] = await provider.send_batch([email("f")])
    assert denied.outcome == "unavailable"
    assert [m["custom_args"][INTENT_TAG] for m in fake.messages] == ["d", "e"]


async def test_nothing_handed_over_raises_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with adapter(url) as provider:
        with pytest.raises(Unavailable):
            await provider.send_batch([email("a")])
