"""The webhook endpoint over real HTTP, signed as each provider signs, on a real database."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from tests.webhooks.conftest import Hooks, sent_intents, snapshot, status_of
from tests.webhooks.payloads import (
    resend_body,
    sendgrid_body,
    sendgrid_event,
    ses_event,
)


async def post_sns(hooks: Hooks, message: dict[str, object]) -> int:
    return await hooks.post(
        "/webhooks/ses",
        json.dumps(message).encode(),
        {"x-amz-sns-message-type": str(message["Type"]), "content-type": "text/plain"},
    )


async def test_each_provider_moves_its_intents(hooks: Hooks) -> None:
    ses = await sent_intents(hooks.pool, 2, provider="ses")
    resend = await sent_intents(hooks.pool, 1, provider="resend")
    grid = await sent_intents(hooks.pool, 2, provider="sendgrid")

    # SES through SNS, both signature versions; matched by message id and by tag.
    delivered = hooks.keys.sns_message(
        hooks.certs.cert_url, ses_event("Delivery", ses[0][2], ses[0][1]), version="1"
    )
    bounced = hooks.keys.sns_message(
        hooks.certs.cert_url,
        ses_event("Bounce", "unknown-id", ses[1][1], intent_id=ses[1][0]),
        version="2",
    )
    assert await post_sns(hooks, delivered) == 200
    assert await post_sns(hooks, bounced) == 200
    # Resend: a hard bounce matched by email_id.
    body = resend_body("email.bounced", resend[0][2], resend[0][1])
    assert await hooks.post("/webhooks/resend", body, hooks.keys.resend_headers(body)) == 200
    # SendGrid: one batch, a delivery then a spam report for one, a delivery for the other,
    # matched through the X-Message-Id prefix of sg_message_id.
    events = [
        sendgrid_event("delivered", grid[0][2], grid[0][1]),
        sendgrid_event("spamreport", grid[0][2], grid[0][1]),
        sendgrid_event("delivered", grid[1][2], grid[1][1]),
    ]
    body = sendgrid_body(events)
    assert await hooks.post("/webhooks/sendgrid", body, hooks.keys.sendgrid_headers(body)) == 200

    assert await status_of(hooks.pool, ses[0][0]) == "delivered"
    assert await status_of(hooks.pool, ses[1][0]) == "bounced"
    assert await status_of(hooks.pool, resend[0][0]) == "bounced"
    assert await status_of(hooks.pool, grid[0][0]) == "complained"
    assert await status_of(hooks.pool, grid[1][0]) == "delivered"
    suppressed = {
        r["address"]: (r["reason"], r["provider"], r["intent_id"])
        for r in await hooks.pool.fetch("SELECT * FROM suppressions")
    }
    assert suppressed == {
        ses[1][1]: ("hard_bounce", "ses", ses[1][0]),
        resend[0][1]: ("hard_bounce", "resend", resend[0][0]),
        grid[0][1]: ("complaint", "sendgrid", grid[0][0]),
    }
    assert hooks.certs.cert_fetches == 1  # cached after the first message
    assert await hooks.pool.fetchval("SELECT count(*) FROM delivery_events") == 6
    assert hooks.count("sendgrid", "accepted") == 1


async def test_forged_stale_replayed_and_tampered_requests_change_nothing(hooks: Hooks) -> None:
    [(intent_id, recipient, message_id)] = await sent_intents(hooks.pool, 1, provider="sendgrid")
    keys, certs = hooks.keys, hooks.certs
    other = type(keys)()  # keys the endpoint does not know
    old = 1_700_000_000  # years ago

    grid = sendgrid_body([sendgrid_event("bounce", message_id, recipient, intent_id=intent_id)])
    res = resend_body("email.bounced", message_id, recipient, intent_id=intent_id)
    ses_body = ses_event("Bounce", message_id, recipient, intent_id=intent_id)
    tampered_grid = grid.replace(b"bounce", b"bounce ", 1)
    good_res_headers = keys.resend_headers(res)
    bad: list[tuple[str, bytes, dict[str, str]]] = [
        # SendGrid: another key, tampered body, stale, future, no headers, garbage signature
        ("/webhooks/sendgrid", grid, other.sendgrid_headers(grid)),
        ("/webhooks/sendgrid", tampered_grid, keys.sendgrid_headers(grid)),
        ("/webhooks/sendgrid", grid, keys.sendgrid_headers(grid, timestamp=old)),
        ("/webhooks/sendgrid", grid, keys.sendgrid_headers(grid, timestamp=old * 2)),
        ("/webhooks/sendgrid", grid, {"content-type": "application/json"}),
        (
            "/webhooks/sendgrid",
            grid,
            {**keys.sendgrid_headers(grid), "X-Twilio-Email-Event-Webhook-Signature": "!!"},
        ),
        # Resend: another secret, tampered body, stale replay, id swapped, no signature
        ("/webhooks/resend", res, other.resend_headers(res)),
        ("/webhooks/resend", res + b" ", good_res_headers),
        ("/webhooks/resend", res, keys.resend_headers(res, timestamp=old)),
        ("/webhooks/resend", res, {**good_res_headers, "svix-id": "msg_other"}),
        ("/webhooks/resend", res, {"svix-id": "a", "svix-timestamp": "1"}),
    ]
    sns_bad = [
        other.sns_message(certs.cert_url, ses_body),  # signed by a key not in the cert
        keys.sns_message(certs.cert_url, ses_body, topic="arn:aws:sns:eu-west-1:1:other"),
        keys.sns_message(certs.cert_url.replace("localhost", "127.0.0.1"), ses_body),
        keys.sns_message(certs.cert_url.replace("https:", "http:"), ses_body),
        keys.sns_message(f"https://localhost:{certs.port + 1}/x.pem", ses_body),
        keys.sns_message(certs.cert_url, ses_body, version="3"),
    ]
    stale = keys.sns_message(certs.cert_url, ses_body, timestamp=datetime(2020, 1, 1, tzinfo=UTC))
    tampered = keys.sns_message(certs.cert_url, ses_body)
    tampered["Message"] = tampered["Message"].replace("Permanent", "Transient")
    sns_bad += [stale, tampered]
    for message in sns_bad:
        bad.append(("/webhooks/ses", json.dumps(message).encode(), {"content-type": "text/plain"}))

    before = await snapshot(hooks.pool)
    statuses = [await hooks.post(path, body, headers) for path, body, headers in bad]
    assert all(s in (400, 401) for s in statuses), statuses
    assert await snapshot(hooks.pool) == before
    refused = sum(
        hooks.count(source, outcome)
        for source in ("ses", "resend", "sendgrid")
        for outcome in ("forged", "stale", "malformed", "topic")
    )
    assert refused == len(bad)
    assert certs.confirmations == 0

    # The genuine request goes through once; the same request again is a redelivery: 200,
    # and nothing changes the second time.
    good_headers = keys.sendgrid_headers(grid)
    assert await hooks.post("/webhooks/sendgrid", grid, good_headers) == 200
    assert await status_of(hooks.pool, intent_id) == "bounced"
    after_first = await snapshot(hooks.pool)
    assert await hooks.post("/webhooks/sendgrid", grid, good_headers) == 200
    assert await snapshot(hooks.pool) == after_first
    assert hooks.count("sendgrid", "duplicate") == 1


async def test_subscription_confirmed_only_for_allowed_topics(hooks: Hooks) -> None:
    keys, certs = hooks.keys, hooks.certs
    foreign = keys.sns_message(
        certs.cert_url,
        kind="SubscriptionConfirmation",
        topic="arn:aws:sns:eu-west-1:999999999999:someone-else",
        subscribe_url=certs.subscribe_url,
    )
    assert await post_sns(hooks, foreign) == 400
    elsewhere = keys.sns_message(
        certs.cert_url,
        kind="SubscriptionConfirmation",
        subscribe_url="https://attacker.example.com/confirm",
    )
    assert await post_sns(hooks, elsewhere) == 401
    assert certs.confirmations == 0
    allowed = keys.sns_message(
        certs.cert_url, kind="SubscriptionConfirmation", subscribe_url=certs.subscribe_url
    )
    assert await post_sns(hooks, allowed) == 200
    assert certs.confirmations == 1


@pytest.mark.parametrize("settings_overrides", [{"webhook_max_body_bytes": 4096}])
async def test_body_over_the_limit_is_refused(hooks: Hooks) -> None:
    body = b"[" + b" " * (hooks.endpoint.config.max_body_bytes + 10) + b"]"
    status = await hooks.post("/webhooks/sendgrid", body, hooks.keys.sendgrid_headers(body))
    assert status == 413
    assert hooks.count("sendgrid", "too_large") == 1


async def test_unmatched_events_are_kept_and_still_suppress(hooks: Hooks) -> None:
    body = sendgrid_body([sendgrid_event("bounce", "nobody-knows", "Ghost@Example.COM")])
    assert await hooks.post("/webhooks/sendgrid", body, hooks.keys.sendgrid_headers(body)) == 200
    row = await hooks.pool.fetchrow("SELECT intent_id, provider, recipient FROM delivery_events")
    assert row is not None
    assert (row["intent_id"], row["provider"], row["recipient"]) == (
        None,
        "sendgrid",
        "Ghost@example.com",
    )
    assert await hooks.pool.fetchval("SELECT reason FROM suppressions") == "hard_bounce"


async def test_late_delivery_does_not_undo_a_bounce(hooks: Hooks) -> None:
    [(intent_id, recipient, message_id)] = await sent_intents(hooks.pool, 1)
    for event in ("bounce", "delivered"):
        body = sendgrid_body([sendgrid_event(event, message_id, recipient)])
        assert (
            await hooks.post("/webhooks/sendgrid", body, hooks.keys.sendgrid_headers(body)) == 200
        )
    assert await status_of(hooks.pool, intent_id) == "bounced"
    applied = await hooks.pool.fetch("SELECT event_type, applied FROM delivery_events ORDER BY id")
    assert [(r["event_type"], r["applied"]) for r in applied] == [
        ("bounced", True),
        ("delivered", False),
    ]


async def test_soft_bounces_suppress_only_after_the_limit(hooks: Hooks) -> None:
    intents = await sent_intents(hooks.pool, 3, recipient="soft@example.com")
    limit = hooks.endpoint.config.soft_bounce_limit
    assert limit == 3
    for i, (intent_id, recipient, message_id) in enumerate(intents):
        body = resend_body(
            "email.bounced", message_id, recipient, intent_id=intent_id, bounce_type="Transient"
        )
        headers = hooks.keys.resend_headers(body)
        assert await hooks.post("/webhooks/resend", body, headers) == 200
        count = await hooks.pool.fetchval("SELECT count(*) FROM suppressions")
        assert count == (1 if i + 1 >= limit else 0)
    assert await hooks.pool.fetchval("SELECT reason FROM suppressions") == "soft_bounce"
    assert uuid.UUID(str(await hooks.pool.fetchval("SELECT intent_id FROM suppressions")))
