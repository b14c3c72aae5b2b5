"""The dispatcher against real PostgreSQL and a scripted SenderService over real gRPC."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, cast

import asyncpg
import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sluice.common.telemetry import Telemetry, disabled, setup_tracing
from sluice.ingest.repository import insert_intents
from sluice.router import repository
from sluice.router.dispatch import Dispatcher, TemplateCache, next_wait
from sluice.router.health import HealthState, ProviderHealthTracker
from sluice.router.settings import RouterSettings
from sluice.router.stats import RoundResult
from sluice.v1 import sender_pb2_grpc
from tests.conftest import InsertTemplate
from tests.db.db_factories import new_intent
from tests.router.router_fakes import (
    PROVIDERS,
    THROTTLE_RETRY_AFTER,
    FakeSender,
    long_ago,
    rows,
    seed,
)


def base_settings(pg_dsn: str, **overrides: Any) -> RouterSettings:
    values: dict[str, Any] = {
        "database_url": pg_dsn,
        "router_batch_size": 100,
        "router_concurrency": 1,
        "router_idle_sleep": 0.02,
        "lease_seconds": 5.0,
        "sender_timeout_seconds": 2.0,
        "max_attempts": 3,
        "retry_base_seconds": 0.01,
        "retry_max_seconds": 0.05,
        "shutdown_grace_seconds": 2.0,
    }
    values.update(overrides)
    settings = RouterSettings(**values)
    settings.validate()
    return settings


MakeDispatcher = Callable[..., Dispatcher]


@pytest.fixture
def make_dispatcher(
    pg_dsn: str, pg_pool: asyncpg.Pool, sender_channel: grpc.aio.Channel
) -> MakeDispatcher:
    def make(
        *,
        telemetry: Telemetry | None = None,
        health: ProviderHealthTracker | None = None,
        **overrides: Any,
    ) -> Dispatcher:
        return Dispatcher(
            base_settings(pg_dsn, **overrides),
            pg_pool,
            cast(Any, sender_pb2_grpc.SenderServiceStub(sender_channel)),
            PROVIDERS,
            telemetry if telemetry is not None else disabled(),
            health=health,
            rng=random.Random(42),
        )

    return make


async def test_accepted_intent_is_sent_through_the_cheapest_provider(
    pg_pool: asyncpg.Pool, template: str, fake: FakeSender, make_dispatcher: MakeDispatcher
) -> None:
    ids = await seed(pg_pool, ["ok1@example.com", "ok2@example.com"])
    dispatcher = make_dispatcher()
    result = await dispatcher.run_round()
    assert (result.leased, result.sent, result.written) == (2, 2, 2)
    stored = await rows(pg_pool, ids)
    for intent_id in ids:
        row = stored[intent_id]
        assert row["status"] == "sent"
        assert row["provider"] == "cheap"
        assert row["provider_message_id"] == f"cheap-{intent_id}"
        assert row["attempts"] == 1
        assert row["lease_id"] is None
    (call,) = fake.calls
    assert call.provider == "cheap"
    assert call.template.id == "welcome"
    assert call.template.from_address == "noreply@example.com"
    assert list(call.template.variables) == ["name"]
    assert {m.intent_id for m in call.messages} == {str(i) for i in ids}
    assert all(m.idempotency_key == m.intent_id for m in call.messages)
    assert all(m.variables["name"] == "Alice" for m in call.messages)
    assert all(m.traceparent == "" for m in call.messages)  # tracing off: no trace work
    assert call.metadata.get("x-request-id")
    assert dispatcher.stats.sent["cheap"] == 2
    # Nothing is due any more: the next round leases nothing.
    assert (await dispatcher.run_round()).leased == 0


async def test_submitted_extras_travel_on_each_message(
    pg_pool: asyncpg.Pool, template: str, fake: FakeSender, make_dispatcher: MakeDispatcher
) -> None:
    extras = {"reply_to": "help@example.com", "headers": {"X-A": "1"}, "tags": {"cohort": "b"}}
    rich, plain = (
        new_intent("rich", recipient="ok1@example.com", **extras),
        new_intent("plain", recipient="ok2@example.com"),
    )
    await insert_intents(pg_pool, [rich, plain])
    assert (await make_dispatcher().run_round()).sent == 2
    by_id = {m.intent_id: m for call in fake.calls for m in call.messages}
    sent_rich, sent_plain = by_id[str(rich.id)], by_id[str(plain.id)]
    assert (sent_rich.reply_to, dict(sent_rich.headers), dict(sent_rich.tags)) == (
        "help@example.com",
        {"X-A": "1"},
        {"cohort": "b"},
    )
    assert (sent_plain.reply_to, dict(sent_plain.headers), dict(sent_plain.tags)) == ("", {}, {})


async def test_throttled_goes_back_to_pending_later_without_an_attempt(
    pg_pool: asyncpg.Pool, template: str, make_dispatcher: MakeDispatcher
) -> None:
    (intent_id,) = await seed(pg_pool, ["throttle@example.com"])
    result = await make_dispatcher().run_round()
    assert (result.throttled, result.sent) == (1, 0)
    assert result.throttle_pause is not None
    assert THROTTLE_RETRY_AFTER - 1 <= result.throttle_pause <= THROTTLE_RETRY_AFTER * 1.1
    row = (await rows(pg_pool, [intent_id]))[intent_id]
    assert row["status"] == "pending"
    assert row["attempts"] == 0
    assert row["lease_id"] is None
    assert row["due_at"] >= row["now"] + timedelta(seconds=THROTTLE_RETRY_AFTER - 1)
    assert row["due_at"] <= row["now"] + timedelta(seconds=THROTTLE_RETRY_AFTER * 1.1 + 1)


async def test_transient_failure_retries_then_fails_after_max_attempts(
    pg_pool: asyncpg.Pool, template: str, make_dispatcher: MakeDispatcher
) -> None:
    (intent_id,) = await seed(pg_pool, ["transient@example.com"])
    dispatcher = make_dispatcher(max_attempts=3)
    for attempt in (1, 2):
        result = await dispatcher.run_round()
        assert result.retrying == 1
        row = (await rows(pg_pool, [intent_id]))[intent_id]
        assert (row["status"], row["attempts"]) == ("pending", attempt)
        assert row["last_error"] == "cheap answered 503"
        await asyncio.sleep(0.06)  # past retry_max_seconds: due again
    result = await dispatcher.run_round()
    assert result.failed == 1
    row = (await rows(pg_pool, [intent_id]))[intent_id]
    assert (row["status"], row["attempts"]) == ("failed", 3)
    assert "attempts exhausted (3)" in row["last_error"]


async def test_permanent_failure_fails_with_the_reason(
    pg_pool: asyncpg.Pool, template: str, make_dispatcher: MakeDispatcher
) -> None:
    (intent_id,) = await seed(pg_pool, ["permanent@example.com"])
    await make_dispatcher().run_round()
    row = (await rows(pg_pool, [intent_id]))[intent_id]
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert row["last_error"] == "mailbox does not exist"


async def test_mixed_lease_each_intent_gets_its_own_outcome_in_one_round(
    pg_pool: asyncpg.Pool, template: str, fake: FakeSender, make_dispatcher: MakeDispatcher
) -> None:
    fake.reverse = True  # results out of request order: matched by intent id
    ok = await seed(pg_pool, ["ok@example.com"])
    orphan = await seed(pg_pool, ["ok-tx@example.com"], kind="transactional")
    late = await seed(pg_pool, ["ok-late@example.com"], send_at=long_ago(), deadline=timedelta(0))
    perm = await seed(pg_pool, ["permanent@example.com"])
    lost = await seed(pg_pool, ["noresult@example.com"])
    result = await make_dispatcher().run_round()
    assert result.leased == result.written == 5
    stored = await rows(pg_pool, ok + orphan + late + perm + lost)
    assert stored[ok[0]]["status"] == "sent"
    # Only the disabled provider serves transactional: it waits, alone, with the reason (the
    # seed threw and lost the batch; the foundation failed it at once).
    assert stored[orphan[0]]["status"] == "pending"
    assert stored[orphan[0]]["last_error"].startswith(
        "waiting: no usable provider for transactional"
    )
    assert stored[orphan[0]]["attempts"] == 0
    assert stored[orphan[0]]["due_at"] > stored[orphan[0]]["now"]
    assert stored[late[0]]["status"] == "expired"
    assert stored[late[0]]["attempts"] == 0
    assert stored[perm[0]]["status"] == "failed"
    assert (stored[lost[0]]["status"], stored[lost[0]]["attempts"]) == ("pending", 1)
    # Neither the expired nor the unroutable intent reached the sender.
    assert {m.intent_id for m in fake.sent()} == {str(i) for i in ok + perm + lost}


async def test_missing_template_fails_only_its_intents(
    pg_pool: asyncpg.Pool,
    template: str,
    insert_template: InsertTemplate,
    fake: FakeSender,
    make_dispatcher: MakeDispatcher,
) -> None:
    await insert_template("doomed")
    good = await seed(pg_pool, ["ok@example.com"])
    doomed = await seed(pg_pool, ["ok2@example.com"], template_id="doomed")
    # Deleting a template intents still point at needs the foreign key out of the way.
    await pg_pool.execute("ALTER TABLE intents DROP CONSTRAINT intents_template_id_fkey")
    await pg_pool.execute("DELETE FROM templates WHERE id = 'doomed'")
    await make_dispatcher().run_round()
    stored = await rows(pg_pool, good + doomed)
    assert stored[good[0]]["status"] == "sent"
    assert stored[doomed[0]]["status"] == "failed"
    assert stored[doomed[0]]["last_error"] == "template doomed not found"


@pytest.mark.parametrize(
    ("mode", "code", "attempts"),
    [
        # The sender refused before any provider saw the batch: retried, no attempt spent.
        ("abort", "UNAVAILABLE", 0),
        # The call may have reached the provider: a transient attempt.
        ("timeout", "DEADLINE_EXCEEDED", 1),
    ],
)
async def test_failed_sendbatch_call_is_retried_for_all_its_messages(
    pg_pool: asyncpg.Pool,
    template: str,
    fake: FakeSender,
    make_dispatcher: MakeDispatcher,
    mode: str,
    code: str,
    attempts: int,
) -> None:
    if mode == "abort":
        fake.abort = grpc.StatusCode.UNAVAILABLE
    else:
        fake.delay = 1.0
    ids = await seed(pg_pool, ["ok1@example.com", "ok2@example.com"])
    dispatcher = make_dispatcher(sender_timeout_seconds=0.3)
    result = await dispatcher.run_round()
    assert (result.retrying, result.written) == (2, 2)
    assert dispatcher.stats.batch_errors == 1
    for row in (await rows(pg_pool, ids)).values():
        assert (row["status"], row["attempts"]) == ("pending", attempts)
        assert code in row["last_error"]


async def test_degraded_provider_fails_over_to_a_healthy_one(
    pg_pool: asyncpg.Pool, template: str, fake: FakeSender, make_dispatcher: MakeDispatcher
) -> None:
    health = ProviderHealthTracker(PROVIDERS, min_samples=5)
    dispatcher = make_dispatcher(health=health, max_attempts=10)
    fake.fail_providers = {"cheap"}
    await seed(pg_pool, [f"ok{i}@example.com" for i in range(6)])
    await dispatcher.run_round()
    assert health.state("cheap") is HealthState.DEGRADED
    assert health.success_rate("cheap") == 0.0
    fake.calls.clear()
    await asyncio.sleep(0.06)
    result = await dispatcher.run_round()
    assert result.sent == 6
    assert {c.provider for c in fake.calls} == {"dear"}
    assert health.state("dear") is HealthState.HEALTHY


async def test_expired_lease_of_a_crashed_router_is_reclaimed_and_sent(
    pg_pool: asyncpg.Pool, template: str, fake: FakeSender, make_dispatcher: MakeDispatcher
) -> None:
    (intent_id,) = await seed(pg_pool, ["ok@example.com"])
    # A router leases and dies before writing anything back.
    crashed_lease = uuid.uuid4()
    crashed = await repository.lease(pg_pool, lease_id=crashed_lease, limit=10, lease_seconds=30)
    assert [i.id for i in crashed] == [intent_id]
    dispatcher = make_dispatcher()
    # While the lease lives, nobody else may take the intent (promise 3).
    assert await dispatcher.reclaim_once() == 0
    assert (await dispatcher.run_round()).leased == 0
    # Fast-forward past the lease's expiry instead of sleeping through it.
    await pg_pool.execute(
        "UPDATE intents SET lease_expires_at = now() - interval '1 second' WHERE lease_id = $1",
        crashed_lease,
    )
    assert await dispatcher.reclaim_once() == 1
    result = await dispatcher.run_round()
    assert result.sent == 1
    row = (await rows(pg_pool, [intent_id]))[intent_id]
    assert (row["status"], row["attempts"]) == ("sent", 1)
    assert len(fake.sent()) == 1


async def test_running_dispatcher_reclaims_by_itself(
    pg_pool: asyncpg.Pool, template: str, make_dispatcher: MakeDispatcher
) -> None:
    (intent_id,) = await seed(pg_pool, ["ok@example.com"])
    await repository.lease(pg_pool, lease_id=uuid.uuid4(), limit=10, lease_seconds=0.2)
    dispatcher = make_dispatcher(lease_seconds=0.6, sender_timeout_seconds=0.5)
    await dispatcher.start()
    try:
        for _ in range(100):
            if (await rows(pg_pool, [intent_id]))[intent_id]["status"] == "sent":
                break
            await asyncio.sleep(0.05)
    finally:
        await dispatcher.stop(1.0)
    assert (await rows(pg_pool, [intent_id]))[intent_id]["status"] == "sent"
    assert dispatcher.stats.reclaimed == 1


async def test_shutdown_marks_calls_in_flight_unknown_and_releases_only_unsent(
    pg_pool: asyncpg.Pool, template: str, fake: FakeSender, make_dispatcher: MakeDispatcher
) -> None:
    fake.block = asyncio.Event()  # the sender never answers
    ids = await seed(pg_pool, [f"ok{i}@example.com" for i in range(3)])
    dispatcher = make_dispatcher()
    await dispatcher.start()
    await asyncio.wait_for(fake.received.wait(), 5)
    assert {r["status"] for r in (await rows(pg_pool, ids)).values()} == {"leased"}
    await dispatcher.stop(0.2)
    # The call reached the sender: its outcome is unknown, so it spends an attempt and is
    # never simply released (a release would hand it to the next router with no trace).
    assert dispatcher.stats.released == 0
    for row in (await rows(pg_pool, ids)).values():
        assert (row["status"], row["attempts"], row["lease_id"]) == ("pending", 1, None)
        assert "outcome unknown: round cancelled" in row["last_error"]


async def test_shutdown_lets_a_round_in_flight_finish_within_the_grace(
    pg_pool: asyncpg.Pool, template: str, fake: FakeSender, make_dispatcher: MakeDispatcher
) -> None:
    fake.delay = 0.3
    ids = await seed(pg_pool, ["ok1@example.com", "ok2@example.com"])
    dispatcher = make_dispatcher()
    await dispatcher.start()
    await asyncio.wait_for(fake.received.wait(), 5)
    await dispatcher.stop(5.0)
    assert dispatcher.stats.released == 0
    assert {r["status"] for r in (await rows(pg_pool, ids)).values()} == {"sent"}
    fake.calls.clear()
    await asyncio.sleep(0.1)
    assert fake.calls == []  # stopped: no more leasing


async def test_all_throttled_round_pauses_the_worker(
    pg_pool: asyncpg.Pool, template: str, fake: FakeSender, make_dispatcher: MakeDispatcher
) -> None:
    ids = await seed(pg_pool, ["throttle@example.com"])
    dispatcher = make_dispatcher()
    await dispatcher.start()
    await asyncio.wait_for(fake.received.wait(), 5)
    # Make the throttled intent due again at once: a worker that did not pause would lease
    # it again within the idle sleep of 20 ms.
    await asyncio.sleep(0.05)
    await pg_pool.execute("UPDATE intents SET due_at = now() WHERE id = $1", ids[0])
    await asyncio.sleep(0.3)
    await dispatcher.stop(1.0)
    assert len(fake.calls) == 1


async def test_tracing_joins_each_intent_to_its_submitting_trace(
    pg_pool: asyncpg.Pool, template: str, fake: FakeSender, make_dispatcher: MakeDispatcher
) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_tracing("router-test", span_exporter=exporter)
    submit_trace = "0af7651916cd43dd8448eb211c80319c"
    submit_span = "b7ad6b7169203331"
    traced = await seed(
        pg_pool, ["ok@example.com"], traceparent=f"00-{submit_trace}-{submit_span}-01"
    )
    untraced = await seed(pg_pool, ["ok2@example.com"])
    try:
        await make_dispatcher(telemetry=telemetry).run_round()
        assert telemetry.provider is not None
        telemetry.provider.force_flush()
    finally:
        telemetry.shutdown()
    by_intent = {m.intent_id: m.traceparent for m in fake.sent()}
    context = TraceContextTextMapPropagator().extract({"traceparent": by_intent[str(traced[0])]})
    sent_span = trace.get_current_span(context).get_span_context()
    assert format(sent_span.trace_id, "032x") == submit_trace
    spans = exporter.get_finished_spans()
    route = {(s.attributes or {})["sluice.intent_id"]: s for s in spans if s.name == "sluice.route"}
    (batch,) = [s for s in spans if s.name == "sluice.dispatch"]
    span = route[str(traced[0])]
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == submit_span
    assert span.context.span_id == sent_span.span_id
    assert (span.attributes or {})["sluice.status"] == "sent"
    assert [link.context.span_id for link in span.links] == [batch.context.span_id]
    # An intent submitted without a trace hangs under the batch span instead.
    loose = route[str(untraced[0])]
    assert loose.parent is not None
    assert loose.parent.span_id == batch.context.span_id
    assert by_intent[str(untraced[0])].split("-")[1] == format(batch.context.trace_id, "032x")


async def test_a_failing_round_gives_its_lease_back_and_the_worker_carries_on(
    pg_pool: asyncpg.Pool,
    template: str,
    fake: FakeSender,
    make_dispatcher: MakeDispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = await seed(pg_pool, ["ok1@example.com", "ok2@example.com"])
    dispatcher = make_dispatcher()
    real_get_many = TemplateCache.get_many
    failures = 0

    async def flaky_get_many(self: TemplateCache, template_ids: Any) -> Any:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RuntimeError("database hiccup")
        return await real_get_many(self, template_ids)

    monkeypatch.setattr(TemplateCache, "get_many", flaky_get_many)
    with pytest.raises(RuntimeError, match="hiccup"):
        await dispatcher.run_round()
    # Nothing was sent, so the lease is released at once rather than left to expire.
    for row in (await rows(pg_pool, ids)).values():
        assert (row["status"], row["attempts"], row["lease_id"]) == ("pending", 0, None)
    assert fake.calls == []
    failures = 0  # the worker's first round fails the same way; it must carry on
    await dispatcher.start()
    try:
        for _ in range(100):
            if {r["status"] for r in (await rows(pg_pool, ids)).values()} == {"sent"}:
                break
            await asyncio.sleep(0.05)
    finally:
        await dispatcher.stop(1.0)
    assert {r["status"] for r in (await rows(pg_pool, ids)).values()} == {"sent"}
    assert dispatcher.stats.round_errors == 1
    assert dispatcher.stats.released == 4  # twice the two intents, once per failed round


async def test_workers_back_off_while_the_sender_is_unreachable(
    pg_pool: asyncpg.Pool, template: str, fake: FakeSender, make_dispatcher: MakeDispatcher
) -> None:
    # Every SendBatch fails UNAVAILABLE. Without a back-off the worker leases and writes
    # back again at once (hundreds of rounds a second, seen with a killed sender).
    fake.abort = grpc.StatusCode.UNAVAILABLE
    await seed(pg_pool, [f"ok{i}@example.com" for i in range(50)])
    dispatcher = make_dispatcher(
        router_batch_size=10, router_idle_sleep=0.02, retry_base_seconds=0.001
    )
    await dispatcher.start()
    await asyncio.sleep(1.0)
    await dispatcher.stop(1.0)
    assert 1 <= len(fake.calls) <= 15, len(fake.calls)
    attempts = await pg_pool.fetchval("SELECT max(attempts) FROM intents")
    assert attempts == 0


def test_a_worker_leases_again_at_once_only_behind_a_backlog(pg_dsn: str) -> None:
    # At 500 intents/s, leasing again at once after a part-full lease made rounds of a few
    # intents: router and sender CPU went from about 50 µs to about 1 ms per intent, and
    # ingest's p50 on the same 2 cores from 1.9 to 4.7 ms. A part-full lease now waits,
    # less the fuller it was.
    # The pacing is the router's, shared by its workers: each waits ``concurrency`` times as
    # long (4 workers pacing alone made four times the rounds, a quarter as full, for twice
    # the router and sender CPU per intent at 500/s), and a backlog found by one wakes them.
    settings = base_settings(
        pg_dsn, router_idle_sleep=0.2, router_batch_size=500, router_concurrency=4
    )
    full = next_wait(RoundResult(leased=500, sent=500, batches=1), settings)
    assert full.seconds == 0
    assert full.wakes_others
    part = next_wait(RoundResult(leased=50, sent=50, batches=1), settings)
    fuller = next_wait(RoundResult(leased=400, sent=400, batches=1), settings)
    assert part.seconds == pytest.approx(0.18 * 4)
    assert 0 < fuller.seconds < part.seconds
    assert part.until_backlog
    assert not part.until_recovery
    # the other waits are as before
    assert next_wait(RoundResult(), settings).seconds == 0.2
    down = next_wait(RoundResult(leased=5, batches=1, unreachable=1), settings)
    assert down.until_recovery
    assert down.seconds == settings.outage_probe_seconds
    throttled = next_wait(RoundResult(leased=5, batches=1, throttle_pause=0.7), settings)
    assert (throttled.seconds, throttled.jitter) == (0.7, (1.0, 1.0))
    # A full lease that could not be sent is no backlog to wake the other workers for:
    # they would only lease rows that cannot go either.
    stuck_full = next_wait(RoundResult(leased=500, batches=1, throttle_pause=0.7), settings)
    down_full = next_wait(RoundResult(leased=500, batches=1, unreachable=1), settings)
    assert not stuck_full.wakes_others
    assert not down_full.wakes_others


async def test_a_full_lease_wakes_the_workers_pacing_a_trickle(
    make_dispatcher: MakeDispatcher,
) -> None:
    dispatcher = make_dispatcher(router_idle_sleep=5.0, router_batch_size=10)
    part = dispatcher._after_round(RoundResult(leased=3, sent=3, batches=1))
    assert part.seconds > 1
    pacing = asyncio.create_task(dispatcher._pause(part.seconds, wake_on_backlog=True))
    idle = asyncio.create_task(dispatcher._pause(5.0))
    await asyncio.sleep(0.05)
    assert not pacing.done()
    full = dispatcher._after_round(RoundResult(leased=10, sent=10, batches=1))
    assert full.seconds == 0
    await asyncio.wait_for(pacing, 1.0)  # woken by the backlog, not after its seconds
    assert not idle.done()  # a wait that did not ask is not cut short
    idle.cancel()
