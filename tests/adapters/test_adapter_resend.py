"""The Resend adapter against the local Resend fake, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluice.common.errors import Unavailable
from sluice.common.providers import ProviderConfig, ResendSettings, Secret
from sluice.sender.providers import build_adapters
from sluice.sender.providers.base import INTENT_TAG, Announced
from sluice.sender.providers.resend import ResendProvider, announced, idempotency_key
from tests.adapters.messages import email
from tests.fakes.resend_fake import FakeResend

KEY = "re_test_key"


@pytest.fixture
async def fake() -> AsyncIterator[FakeResend]:
    async with FakeResend(api_key=KEY) as server:
        yield server


@contextlib.asynccontextmanager
async def adapter(
    url: str, *, key: str = KEY, wait: float = 5.0, mode: str = "permissive"
) -> AsyncIterator[ResendProvider]:
    settings = ResendSettings(
        api_key=Secret("value", key),
        base_url=url,
        timeout_seconds=wait,
        batch_validation=mode,  # type: ignore[arg-type]
    )
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=wait
    ) as client:
        yield ResendProvider("resend", settings, client)


# ---- the fake refuses what Resend refuses -------------------------------------------------


async def test_fake_refuses_what_resend_refuses(fake: FakeResend) -> None:
    good = {"from": "a@sluice.test", "to": ["b@example.com"], "subject": "s", "html": "h"}
    auth = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=fake.url) as client:
        r = await client.post("/emails", json=good)
        assert (r.status_code, r.json()["name"]) == (401, "missing_api_key")
        r = await client.post("/emails", json=good, headers={"Authorization": "Bearer nope"})
        assert (r.status_code, r.json()["name"]) == (403, "invalid_api_key")
        r = await client.post("/emails", json={**good, "subject": ""}, headers=auth)
        assert (r.status_code, r.json()["name"]) == (422, "missing_required_field")
        r = await client.post("/emails", json={**good, "from": "nobody"}, headers=auth)
        assert (r.status_code, r.json()["name"]) == (422, "invalid_from_address")
        bad_tag = {**good, "tags": [{"name": "a b", "value": "x"}]}
        assert (await client.post("/emails", json=bad_tag, headers=auth)).status_code == 422
        r = await client.post("/emails/batch", json=[good] * 101, headers=auth)
        assert r.status_code == 422
        r = await client.post("/emails/batch", json=[{**good, "scheduled_at": "x"}], headers=auth)
        assert r.status_code == 422
        # Strict (the default) fails the whole batch; permissive sends the good ones.
        mixed = [good, {**good, "to": ["not an address"]}]
        assert (await client.post("/emails/batch", json=mixed, headers=auth)).status_code == 422
        r = await client.post(
            "/emails/batch", json=mixed, headers={**auth, "x-batch-validation": "permissive"}
        )
        assert r.status_code == 200
        assert len(r.json()["data"]) == 1
        assert r.json()["errors"][0]["index"] == 1
        # Idempotency: key length, replay without sending, conflict on another body.
        long_key = {**auth, "Idempotency-Key": "k" * 257}
        r = await client.post("/emails", json=good, headers=long_key)
        assert (r.status_code, r.json()["name"]) == (400, "invalid_idempotency_key")
        keyed = {**auth, "Idempotency-Key": "k1"}
        first = await client.post("/emails", json=good, headers=keyed)
        again = await client.post("/emails", json=good, headers=keyed)
        assert first.json() == again.json()
        other = await client.post("/emails", json={**good, "subject": "t"}, headers=keyed)
        assert (other.status_code, other.json()["name"]) == (409, "invalid_idempotent_request")
    assert len(fake.emails) == 2  # the permissive one and k1, once


async def test_fake_rate_limit_headers_and_concurrent_idempotency() -> None:
    async with FakeResend(api_key=KEY, requests_per_second=2, processing_seconds=0.3) as fake:
        good = {"from": "a@sluice.test", "to": ["b@example.com"], "subject": "s", "text": "t"}
        auth = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "same"}
        async with httpx.AsyncClient(base_url=fake.url, timeout=5) as client:
            first, second = await asyncio.gather(
                client.post("/emails", json=good, headers=auth),
                client.post("/emails", json=good, headers=auth),
            )
            names = sorted([first.status_code, second.status_code])
            assert names == [200, 409]
            conflict = first if first.status_code == 409 else second
            assert conflict.json()["name"] == "concurrent_idempotent_requests"
            assert first.headers["ratelimit-limit"] == "2"
            third = await client.post(
                "/emails", json=good, headers={"Authorization": f"Bearer {KEY}"}
            )
            if third.status_code == 429:  # same second as the first two
                assert third.json()["name"] == "rate_limit_exceeded"
                assert int(third.headers["retry-after"]) >= 1


# ---- the adapter -------------------------------------------------------------------------


async def test_batches_of_100_with_tags_headers_and_one_key_per_request(fake: FakeResend) -> None:
    messages = [
        email(
            f"i{n}",
            f"r{n}@example.com",
            reply_to="help@sluice.test",
            tags=(("campaign", "winter sale"),),
            headers=(("X-Campaign", "winter"),),
            list_unsubscribe_url="https://sluice.test/u/abc",
        )
        for n in range(250)
    ]
    async with adapter(fake.url) as provider:
        results = await provider.send_batch(messages)
    assert [r.intent_id for r in results] == [m.intent_id for m in messages]
    assert {r.outcome for r in results} == {"accepted"}
    assert [len(json.loads(r["body"])) for r in fake.requests] == [100, 100, 50]
    assert {r["path"] for r in fake.requests} == {"/emails/batch"}
    keys = [r["headers"]["Idempotency-Key"] for r in fake.requests]
    assert len(set(keys)) == 3
    assert all(len(k) <= 256 for k in keys)
    sent = {e["id"]: e for e in fake.emails}
    first = sent[results[0].provider_message_id]
    assert first["to"] == ["r0@example.com"]
    assert first["reply_to"] == ["help@sluice.test"]
    assert {"name": INTENT_TAG, "value": "i0"} in first["tags"]
    assert {"name": "campaign", "value": "winter_sale"} in first["tags"]
    assert first["headers"] == {
        "X-Campaign": "winter",
        "List-Unsubscribe": "<https://sluice.test/u/abc>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


async def test_a_retry_of_the_same_messages_sends_nothing_twice(fake: FakeResend) -> None:
    messages = [email(f"i{n}") for n in range(3)]
    async with adapter(fake.url) as provider:
        first = await provider.send_batch(messages)
        again = await provider.send_batch(messages)
        [single] = await provider.send_batch([email("solo")])
    assert [r.provider_message_id for r in first] == [r.provider_message_id for r in again]
    assert len(fake.emails) == 4
    assert single.outcome == "accepted"
    assert fake.requests[-1]["path"] == "/emails"
    assert fake.requests[-1]["headers"]["Idempotency-Key"] == "key-solo"
    assert idempotency_key(messages) == idempotency_key(list(messages))
    assert idempotency_key(messages) != idempotency_key(messages[:2])
    assert len(idempotency_key([email("x" * 300)])) <= 256


async def test_timeout_after_sending_is_retried_with_the_same_key_and_sent_once(
    fake: FakeResend,
) -> None:
    fake.hold_next, fake.hold_seconds = 1, 6.0
    async with adapter(fake.url, wait=2.0) as provider:
        results = await provider.send_batch([email("a"), email("b")])
    assert [r.outcome for r in results] == ["accepted", "accepted"]
    assert len(fake.requests) == 2
    assert len(fake.emails) == 2


async def test_cut_connection_twice_is_unknown(fake: FakeResend) -> None:
    fake.cut_next = 2
    async with adapter(fake.url) as provider:
        results = await provider.send_batch([email("a"), email("b")])
    assert [r.outcome for r in results] == ["unknown", "unknown"]
    assert len(fake.emails) == 2  # it was received: that is why the outcome is unknown


async def test_permissive_batch_refuses_only_the_bad_message(fake: FakeResend) -> None:
    async with adapter(fake.url) as provider:
        results = await provider.send_batch([email("a"), email("b", "not-an-address"), email("c")])
    assert [r.outcome for r in results] == ["accepted", "permanent", "accepted"]
    assert "to" in results[1].reason
    assert {e["to"][0] for e in fake.emails} == {"ada@example.com"}
    assert len({r.provider_message_id for r in results if r.outcome == "accepted"}) == 2


async def test_strict_batch_refuses_all(fake: FakeResend) -> None:
    async with adapter(fake.url, mode="strict") as provider:
        results = await provider.send_batch([email("a"), email("b", "not-an-address")])
    assert [r.outcome for r in results] == ["permanent", "permanent"]
    assert fake.emails == []


async def test_rate_limit_is_throttled_with_retry_after() -> None:
    async with FakeResend(api_key=KEY, requests_per_second=1) as fake, adapter(fake.url) as p:
        results = await p.send_batch([email(f"i{n}") for n in range(150)])
    outcomes = [r.outcome for r in results]
    assert outcomes.count("accepted") in (50, 100)  # one request of the two got through
    throttled = [r for r in results if r.outcome == "throttled"]
    assert len(throttled) in (50, 100)
    assert all(1 <= r.retry_after <= 2 for r in throttled)
    assert "rate_limit_exceeded" in throttled[0].reason


async def test_every_answer_announces_the_request_limit() -> None:
    async with FakeResend(api_key=KEY, requests_per_second=1) as fake, adapter(fake.url) as p:
        first = await p.send_batch([email("a")])
        second = await p.send_batch([email("b")])
    # Limit 1 a second: the first answer of a window has nothing left (wait for the reset),
    # and the second is either refused in that window or the first of the next.
    assert first[0].outcome == "accepted"
    assert first[0].announced is not None
    assert first[0].announced.requests_per_second == 1.0
    assert 0 < first[0].announced.reset_after <= 1
    assert second[0].announced is not None
    assert second[0].announced.requests_per_second == 1.0
    assert second[0].outcome in ("accepted", "throttled")


def test_resend_headers_are_read_as_documented() -> None:
    def read(**headers: str) -> Announced | None:
        return announced(httpx.Headers({k.replace("_", "-"): v for k, v in headers.items()}))

    assert read() is None
    assert read(ratelimit_limit="5", ratelimit_remaining="4", ratelimit_reset="1") == Announced(5)
    assert read(ratelimit_limit="5", ratelimit_remaining="0", ratelimit_reset="1") == Announced(
        5, 1
    )
    # Another window named by the draft's policy header: 120 per minute is 2 a second.
    policy = read(ratelimit_limit="120", ratelimit_remaining="7", ratelimit_policy="120;w=60")
    assert policy == Announced(2)
    # Nothing left but the window resets now: no pause.
    assert read(ratelimit_limit="2", ratelimit_remaining="0", ratelimit_reset="0") == Announced(2)
    assert read(ratelimit_limit="lots", ratelimit_remaining="0", ratelimit_reset="3") == Announced(
        0, 3
    )


_NUMBERS = st.one_of(st.floats(allow_nan=True).map(str), st.integers().map(str))
_HEADER_VALUES = st.one_of(
    st.text(max_size=12), _NUMBERS, st.tuples(_NUMBERS, _NUMBERS).map("{0[0]};w={0[1]}".format)
)


@given(
    st.dictionaries(
        st.sampled_from(
            ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "ratelimit-policy"]
        ),
        _HEADER_VALUES,
    )
)
def test_any_rate_limit_headers_read_to_a_bounded_announcement(headers: dict[str, str]) -> None:
    try:
        parsed = httpx.Headers(headers)
    except (UnicodeEncodeError, ValueError):
        return  # not a header httpx could receive
    result = announced(parsed)
    if result is not None:
        assert 0 <= result.requests_per_second < float("inf")
        assert 0 <= result.reset_after <= 3600


async def test_daily_quota_pauses_until_it_resets() -> None:
    async with FakeResend(api_key=KEY, daily_quota=1) as fake, adapter(fake.url) as p:
        [ok] = await p.send_batch([email("a")])
        [paused] = await p.send_batch([email("b")])
    assert ok.outcome == "accepted"
    assert paused.outcome == "throttled"
    assert paused.quota
    assert not ok.quota
    assert paused.reason.startswith("quota exhausted; paused_until=")
    assert "daily_quota_exceeded" in paused.reason
    assert 1 <= paused.retry_after <= 86400


async def test_conflicts_server_errors_and_keys(fake: FakeResend) -> None:
    async with adapter(fake.url) as provider:
        await provider.send_batch([email("a")])
        # Same key, other content: the key already sent something; that may be this one.
        [conflict] = await provider.send_batch([email("a", subject="Changed")])
        fake.status_next = [500, 502]
        [server_error] = await provider.send_batch([email("b")])
        [gateway] = await provider.send_batch([email("c")])
    assert (conflict.outcome, "invalid_idempotent_request" in conflict.reason) == ("unknown", True)
    assert server_error.outcome == "transient"
    assert gateway.outcome == "unknown"
    async with adapter(fake.url, key="wrong") as provider:
        [denied] = await provider.send_batch([email("d")])
    assert (denied.outcome, "invalid_api_key" in denied.reason) == ("unavailable", True)


async def test_nothing_handed_over_raises_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with adapter(url) as provider:
        with pytest.raises(Unavailable):
            await provider.send_batch([email("a"), email("b")])


async def test_registry_builds_it_with_the_key_from_the_environment(
    fake: FakeResend, redis_client: object
) -> None:
    config = ProviderConfig(
        name="resend",
        kind="resend",
        cost_per_thousand=0.25,
        sustained_rate=0,
        burst=0,
        intents=frozenset({"transactional"}),
        settings=ResendSettings(api_key=Secret("env", "RESEND_KEY"), base_url=fake.url),
    )
    async with contextlib.AsyncExitStack() as stack:
        adapters = await build_adapters(
            [config],
            stack,
            redis=redis_client,
            prefix="p",  # type: ignore[arg-type]
            environ={"RESEND_KEY": KEY},
        )
        [result] = await adapters["resend"].send_batch([email("a")])
    assert result.outcome == "accepted"
    assert fake.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
