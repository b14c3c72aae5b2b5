"""The monitoring files against the real thing: a real Prometheus scrapes a stack of
``sluice serve`` processes while traffic flows, evaluates deploy/prometheus/rules.yml, and
every metric the Grafana dashboard and the rules read exists with data, every dashboard
query answers, and Prometheus's count of sends matches the database's.

The list of metrics is read from the dashboard JSON and the rules file themselves
(tests/deploy/monitoring.py), so a new panel or rule is checked here without a new line.

Traffic covers every label the files select on: transactional and digest mail through an
unlimited provider (accepted), marketing mail with a short deadline through a provider
allowing 2 messages a second (throttled, denied reservations, expired: deadline misses), a
permanent and a transient failure, duplicates and rejections at ingest, and a few intents
scheduled an hour ahead (pending, not due).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from sluice.v1 import ingest_pb2, ingest_pb2_grpc, intent_pb2
from tests.conftest import InsertTemplate
from tests.deploy.monitoring import dashboard_exprs, used_metrics, used_recordings
from tests.e2e.e2e_stack import service_stack
from tests.e2e.prometheus_server import Prometheus, prometheus_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROVIDERS = """
[[providers]]
name = "fast"
kind = "sandbox"
cost_per_thousand = 0.25
sustained_rate = 0
burst = 0
intents = ["transactional", "digest"]
max_batch_size = 100

[[providers]]
name = "slow"
kind = "sandbox"
cost_per_thousand = 0.1
sustained_rate = 2
burst = 2
intents = ["marketing"]
max_batch_size = 10
"""
WAIT_SECONDS = 90.0


def timestamp(seconds_from_now: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds_from_now))
    return stamp


def submission(
    key: str, recipient: str, kind: int, **fields: Timestamp
) -> intent_pb2.IntentSubmission:
    return intent_pb2.IntentSubmission(
        idempotency_key=key,
        campaign_id="prom",
        recipient=recipient,
        intent=kind,  # type: ignore[arg-type]
        template_id="welcome",
        variables={"name": "Ana"},
        **fields,
    )


def traffic(run: str) -> list[intent_pb2.IntentSubmission]:
    tx, mk, dg = (
        intent_pb2.INTENT_TRANSACTIONAL,
        intent_pb2.INTENT_MARKETING,
        intent_pb2.INTENT_DIGEST,
    )
    items = [submission(f"{run}-tx-{i}", f"user{i}@example.com", tx) for i in range(20)]
    items += [submission(f"{run}-dg-{i}", f"digest{i}@example.com", dg) for i in range(5)]
    items += [
        submission(f"{run}-fail", "nobody@fail.sandbox.example", tx),
        submission(f"{run}-flaky", "someone@flaky.sandbox.example", tx),
        submission(f"{run}-bad-1", "no-at-sign.example.com", tx),
        submission(f"{run}-bad-2", "two@@example.com", tx),
    ]
    # More than the slow provider can send before their deadline: some expire.
    items += [
        submission(f"{run}-mk-{i}", f"fan{i}@example.com", mk, deadline=timestamp(4))
        for i in range(30)
    ]
    items += [
        submission(f"{run}-later-{i}", f"later{i}@example.com", dg, send_at=timestamp(3600))
        for i in range(3)
    ]
    return items


async def submit_wave(
    stub: ingest_pb2_grpc.IngestServiceStub, items: list[intent_pb2.IntentSubmission]
) -> None:
    answer = await stub.SubmitIntents(ingest_pb2.SubmitIntentsRequest(intents=items), timeout=30)
    rejected = [r for r in answer.results if r.HasField("error")]
    assert len(rejected) == 2, rejected
    assert sum(r.created for r in answer.results) == len(items) - 2


async def wait_scraped(prom: Prometheus, targets: int) -> None:
    """Until every target has been scraped twice (so the next increments show as a rate)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        scraped = await prom.value("count(count_over_time(up[1m]) >= 2 and on (job) up == 1)")
        if scraped == targets:
            return
        assert time.monotonic() < deadline, f"{scraped} of {targets} targets scraped twice"
        await asyncio.sleep(0.5)


async def missing_series(prom: Prometheus, names: set[str]) -> list[str]:
    answers = await asyncio.gather(
        *(prom.query(f"count({{__name__={name!r}}})") for name in sorted(names))
    )
    return [name for name, answer in zip(sorted(names), answers, strict=True) if not answer]


async def test_prometheus_scrapes_every_metric_the_dashboard_and_rules_use(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    redis_prefix: str,
    insert_template: InsertTemplate,
    tmp_path: Path,
) -> None:
    metrics, recordings = used_metrics(), used_recordings()
    assert len(metrics) >= 20, metrics  # the parse found the files' metrics, not nothing
    await insert_template("welcome")
    async with service_stack(
        database_url=pg_dsn,
        redis_prefix=redis_prefix,
        log_dir=tmp_path / "stack",
        providers_toml=PROVIDERS,
        SLUICE_MAX_ATTEMPTS="2",
        SLUICE_RETRY_BASE_SECONDS="0.2",
    ) as stack:
        ingest, sender = await asyncio.gather(stack.start("ingest"), stack.start("sender"))
        await stack.start("router", SLUICE_SENDER_TARGET=sender.target)
        # Each process's metrics listener is on the free port the stack gave it.
        jobs = {
            f"sluice-{name}": [f"127.0.0.1:{port}"] for name, port in stack.metrics_ports.items()
        }
        async with prometheus_server(tmp_path / "prometheus", jobs) as prom:
            async with grpc.aio.insecure_channel(ingest.target) as channel:
                stub = ingest_pb2_grpc.IngestServiceStub(channel)
                # Two waves: a counter whose first increments all fall before Prometheus's
                # first scrape shows no rate, as with any process that just started; the
                # second wave comes after every target has been scraped.
                first = traffic(uuid.uuid4().hex[:8])
                await submit_wave(stub, first)
                again = await stub.SubmitIntents(
                    ingest_pb2.SubmitIntentsRequest(intents=first[:5]), timeout=30
                )
                assert not any(r.created for r in again.results)
                await stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=first[5]), timeout=30)
                await wait_scraped(prom, len(jobs))
                await submit_wave(stub, traffic(uuid.uuid4().hex[:8]))

            deadline = time.monotonic() + WAIT_SECONDS
            while True:
                missing = await missing_series(prom, metrics | recordings)
                empty = [e for e in dashboard_exprs() if not await prom.query(e)]
                if not missing and not empty:
                    break
                assert time.monotonic() < deadline, (
                    f"after {WAIT_SECONDS} s Prometheus has no series for {missing}; "
                    f"dashboard queries with no answer: {empty}"
                )
                await asyncio.sleep(1)

            for target in await prom.targets():
                assert target["health"] == "up", target

            # Once the queue settles, Prometheus counts the sends and deadline misses the
            # database recorded.
            while True:
                row = await pg_pool.fetchrow(
                    "SELECT count(*) FILTER (WHERE status = 'sent') AS sent,"
                    " count(*) FILTER (WHERE status = 'expired') AS expired,"
                    " count(*) FILTER (WHERE status IN ('pending', 'leased')"
                    "   AND send_at < now() + interval '10 minutes') AS busy"
                    " FROM intents"
                )
                scraped = (
                    await prom.value("sum(sluice_sends_total)"),
                    await prom.value("sum(sluice_router_deadline_misses_total)"),
                )
                if row["busy"] == 0 and scraped == (row["sent"], row["expired"]):
                    break
                assert time.monotonic() < deadline, (
                    f"database: {dict(row)}; Prometheus: (sends, deadline misses) {scraped}"
                )
                await asyncio.sleep(1)
            assert row["sent"] >= 50  # the transactional and digest mail of both waves
            assert row["expired"] > 0  # the slow provider could not send all marketing in time
            assert await prom.value('sum(sluice_ingest_intents_total{outcome="rejected"})') == 4
            duplicates = await prom.value('sum(sluice_ingest_intents_total{outcome="duplicate"})')
            assert duplicates == 6
