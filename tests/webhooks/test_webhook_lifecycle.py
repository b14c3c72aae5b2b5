"""Events driving the lifecycle: redeliveries, order, suppression, guards, unsubscribe."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from sluice.common.unsubscribe import make_token, unsubscribe_url
from sluice.ingest.webhooks import guards, maintenance
from sluice.router import repository as router_repo
from tests.webhooks.conftest import UNSUBSCRIBE_SECRET, Hooks, sent_intents, status_of
from tests.webhooks.payloads import resend_body, sendgrid_body, sendgrid_event

RANK = {"sent": 0, "delivered": 1, "bounced": 2, "complained": 3}
SG_TYPES = {"delivered": "delivered", "bounce": "bounced", "spamreport": "complained"}


async def post_sendgrid(hooks: Hooks, events: list[dict[str, object]]) -> int:
    body = sendgrid_body(events)
    return await hooks.post("/webhooks/sendgrid", body, hooks.keys.sendgrid_headers(body))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_redelivered_shuffled_events_change_state_once_and_never_backwards(
    hooks: Hooks, seed: int
) -> None:
    rng = random.Random(seed)
    intents = await sent_intents(hooks.pool, 60)
    events = []
    expected: dict[uuid.UUID, str] = {}
    for intent_id, recipient, message_id in intents:
        kinds = rng.choice([["delivered"], ["bounce"], ["delivered", "spamreport"], ["deferred"]])
        for kind in kinds:
            events.append(
                (intent_id, sendgrid_event(kind, message_id, recipient, intent_id=intent_id))
            )
        final = max((SG_TYPES.get(k, "sent") for k in kinds), key=RANK.__getitem__)
        expected[intent_id] = final
    # 30 % of the events are delivered again, and everything arrives shuffled.
    stream = events + rng.sample(events, k=int(len(events) * 0.3))
    rng.shuffle(stream)
    seen: dict[uuid.UUID, str] = {i: "sent" for i, _, _ in intents}
    for start in range(0, len(stream), 17):
        assert await post_sendgrid(hooks, [e for _, e in stream[start : start + 17]]) == 200
        rows = await hooks.pool.fetch("SELECT id, status::text AS s FROM intents")
        for r in rows:
            assert RANK[r["s"]] >= RANK[seen[r["id"]]], "an intent moved backwards"
            seen[r["id"]] = r["s"]
    assert seen == expected
    # exactly one stored event per distinct event, and one applied event per moved intent
    assert await hooks.pool.fetchval("SELECT count(*) FROM delivery_events") == len(events)
    applied = await hooks.pool.fetch(
        "SELECT intent_id, count(*) AS n FROM delivery_events WHERE applied GROUP BY intent_id"
    )
    moved = {i for i, s in expected.items() if s != "sent"}
    assert {r["intent_id"] for r in applied} == moved
    # each applied event moved its intent once; a delivered-then-complained intent moves twice
    # at most (delivered, then complained) and never more.
    assert all(r["n"] <= 2 for r in applied)


async def test_bounce_suppresses_pending_intents_so_no_provider_gets_them(hooks: Hooks) -> None:
    address = "bounce-me@example.com"
    [(sent_id, _, message_id)] = await sent_intents(hooks.pool, 1, recipient=address)
    # queued for the same address, to be routed to another provider (marketing -> ses)
    pending = await sent_intents(hooks.pool, 3, recipient=address, status="pending")
    bystander = await sent_intents(hooks.pool, 1, status="pending")
    assert await post_sendgrid(hooks, [sendgrid_event("bounce", message_id, address)]) == 200
    assert await status_of(hooks.pool, sent_id) == "bounced"
    for intent_id, _, _ in pending:
        assert await status_of(hooks.pool, intent_id) == "suppressed"
    # A router leasing now gets only the bystander: nothing for the bounced address.
    leased = await router_repo.lease(hooks.pool, lease_id=uuid.uuid4(), limit=100, lease_seconds=30)
    assert [row.id for row in leased] == [bystander[0][0]]
    # A later intent to the address, and another bounce report about it: suppressed too.
    [(late_id, _, _)] = await sent_intents(hooks.pool, 1, recipient=address, status="pending")
    [(other_id, _, other_message)] = await sent_intents(hooks.pool, 1, recipient=address)
    assert await post_sendgrid(hooks, [sendgrid_event("bounce", other_message, address)]) == 200
    assert await status_of(hooks.pool, late_id) == "suppressed"
    assert await status_of(hooks.pool, other_id) == "bounced"


@pytest.mark.parametrize("settings_overrides", [{"guard_min_volume": 100}])
async def test_complaint_burst_trips_the_guard_for_marketing_not_transactional(
    hooks: Hooks,
) -> None:
    intents = await sent_intents(hooks.pool, 300, provider="sendgrid-eu")
    deliveries = [sendgrid_event("delivered", m, r) for _, r, m in intents]
    for start in range(0, len(deliveries), 100):
        assert await post_sendgrid(hooks, deliveries[start : start + 100]) == 200
    await maintenance.run_once(hooks.pool, hooks.endpoint.config, hooks.metrics)
    assert await guards.blocked_kinds(hooks.pool) == {}

    # 1 complaint in 300 is 0.33 %: over the 0.1 % threshold.
    _, recipient, message_id = intents[0]
    assert await post_sendgrid(hooks, [sendgrid_event("spamreport", message_id, recipient)]) == 200
    await maintenance.run_once(hooks.pool, hooks.endpoint.config, hooks.metrics)
    assert await guards.blocked_kinds(hooks.pool) == {"sendgrid-eu": {"marketing", "digest"}}
    labels = {"provider": "sendgrid-eu", "guard": "complaint_rate"}
    assert hooks.registry.get_sample_value("sluice_provider_guard_tripped", labels) == 1
    assert (
        hooks.registry.get_sample_value(
            "sluice_provider_guard_tripped", {**labels, "guard": "bounce_rate"}
        )
        == 0
    )
    row = await hooks.pool.fetchrow(
        "SELECT events, volume, tripped_at FROM provider_guards"
        " WHERE provider = 'sendgrid-eu' AND guard = 'complaint_rate'"
    )
    assert row is not None
    assert (row["events"], row["volume"]) == (1, 300)
    assert row["tripped_at"] is not None


def test_guard_judgement() -> None:
    assert not guards.judge("p", "complaint_rate", 5, 99, 0.001, 100).tripped  # too few
    assert not guards.judge("p", "complaint_rate", 1, 1000, 0.001, 100).tripped  # at, not over
    assert guards.judge("p", "complaint_rate", 2, 1000, 0.001, 100).tripped
    assert guards.judge("p", "bounce_rate", 21, 1000, 0.02, 100).tripped
    assert not guards.judge("p", "bounce_rate", 0, 0, 0.02, 0).tripped


async def test_one_click_unsubscribe(hooks: Hooks) -> None:
    address = "leave-me@example.com"
    [(intent_id, _, _)] = await sent_intents(hooks.pool, 1, recipient=address)
    pending = await sent_intents(hooks.pool, 1, recipient=address, status="pending")
    secret = UNSUBSCRIBE_SECRET.encode()
    url = unsubscribe_url(hooks.url, secret, intent_id, ttl=3600)
    form = {"content-type": "application/x-www-form-urlencoded"}
    path = url.removeprefix(hooks.url)
    # GET shows a page and changes nothing (scanners follow links).
    async with hooks.http.get(url) as resp:
        assert resp.status == 200
        assert "List-Unsubscribe" in await resp.text()
    assert await hooks.pool.fetchval("SELECT count(*) FROM suppressions") == 0
    # Wrong body, forged, expired, and unknown-intent tokens are refused.
    assert await hooks.post(path, b"List-Unsubscribe=Yes", form) == 400
    forged = make_token(b"x" * 40, intent_id, ttl=3600)
    expired = make_token(secret, intent_id, ttl=-1)
    unknown = make_token(secret, uuid.uuid4(), ttl=3600)
    assert await hooks.post(f"/unsubscribe/{forged}", b"List-Unsubscribe=One-Click", form) == 400
    assert await hooks.post(f"/unsubscribe/{expired}", b"List-Unsubscribe=One-Click", form) == 400
    assert await hooks.post(f"/unsubscribe/{unknown}", b"List-Unsubscribe=One-Click", form) == 404
    assert await hooks.pool.fetchval("SELECT count(*) FROM suppressions") == 0
    # The real one-click POST suppresses the address and its pending intents; twice is once.
    for _ in range(2):
        assert await hooks.post(path, b"List-Unsubscribe=One-Click", form) == 200
    row = await hooks.pool.fetchrow("SELECT address, reason, intent_id FROM suppressions")
    assert row is not None
    assert (row["address"], row["reason"], row["intent_id"]) == (address, "unsubscribe", intent_id)
    assert await status_of(hooks.pool, pending[0][0]) == "suppressed"
    assert await status_of(hooks.pool, intent_id) == "sent"  # unsubscribing is not a bounce
    assert await hooks.pool.fetchval("SELECT count(*) FROM delivery_events") == 1


async def test_event_that_beats_the_write_back_is_applied_once_the_intent_is_sent(
    hooks: Hooks,
) -> None:
    [(intent_id, recipient, _)] = await sent_intents(hooks.pool, 1, status="leased")
    body = resend_body("email.delivered", "re-123", recipient, intent_id=intent_id)
    assert await hooks.post("/webhooks/resend", body, hooks.keys.resend_headers(body)) == 200
    assert await status_of(hooks.pool, intent_id) == "leased"  # the router still holds it
    await hooks.pool.execute(
        "UPDATE intents SET status = 'sent', provider_message_id = 're-123', lease_id = NULL,"
        " lease_expires_at = NULL WHERE id = $1",
        intent_id,
    )
    await maintenance.run_once(hooks.pool, hooks.endpoint.config, hooks.metrics)
    assert await status_of(hooks.pool, intent_id) == "delivered"
    assert await hooks.pool.fetchval("SELECT applied FROM delivery_events") is True


async def test_unknown_outcome_held_for_reconciliation_is_settled_by_the_event(
    hooks: Hooks,
) -> None:
    # The router (0003) holds an intent whose send outcome was unknown as pending with
    # held_for = 'reconcile'. The column is added here when this schema does not have it yet.
    await hooks.pool.execute("ALTER TABLE intents ADD COLUMN IF NOT EXISTS held_for text")
    [(held, recipient, _)] = await sent_intents(hooks.pool, 1, status="pending")
    [(plain, other, _)] = await sent_intents(hooks.pool, 1, status="pending")
    await hooks.pool.execute("UPDATE intents SET held_for = 'reconcile' WHERE id = $1", held)
    for intent_id, address in ((held, recipient), (plain, other)):
        body = resend_body("email.delivered", f"re-{intent_id}", address, intent_id=intent_id)
        assert await hooks.post("/webhooks/resend", body, hooks.keys.resend_headers(body)) == 200
    assert await status_of(hooks.pool, held) == "delivered"
    # a pending intent nobody sent is not "delivered" by a stray event
    assert await status_of(hooks.pool, plain) == "pending"


@pytest.mark.parametrize(
    "settings_overrides",
    [{"guard_min_volume": 100, "guard_check_seconds": 0.2, "event_raw_retention_days": 1e-5}],
)
async def test_the_running_endpoint_trips_guards_and_clears_old_payloads_by_itself(
    hooks: Hooks,
) -> None:
    intents = await sent_intents(hooks.pool, 150, provider="ses-us")
    deliveries = [sendgrid_event("delivered", m, r) for _, r, m in intents]
    assert await post_sendgrid(hooks, deliveries[:100]) == 200
    assert await post_sendgrid(hooks, deliveries[100:]) == 200
    _, recipient, message_id = intents[0]
    assert await post_sendgrid(hooks, [sendgrid_event("spamreport", message_id, recipient)]) == 200
    deadline = asyncio.get_running_loop().time() + 20
    while await guards.blocked_kinds(hooks.pool) != {"ses-us": {"marketing", "digest"}}:
        assert asyncio.get_running_loop().time() < deadline, "the guard never tripped"
        await asyncio.sleep(0.1)
    # payloads older than the retention (here under a second) are cleared, events stay
    while await hooks.pool.fetchval("SELECT count(*) FROM delivery_events WHERE raw IS NOT NULL"):
        assert asyncio.get_running_loop().time() < deadline, "raw payloads were never cleared"
        await asyncio.sleep(0.1)
    assert await hooks.pool.fetchval("SELECT count(*) FROM delivery_events") == 151
