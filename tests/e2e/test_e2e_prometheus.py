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

from sluice.cli.embedded import find_free_port
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
        ports = {svc: find_free_port() for svc in ("ingest", "router", "sender")}
        ingest, sender = await asyncio.gather(
            stack.start("ingest", SLUICE_METRICS_PORT=str(ports["ingest"])),
            stack.start("sender", SLUICE_METRICS_PORT=str(ports["sender"])),
        )
        await stack.start(
            "router",
            SLUICE_METRICS_PORT=str(ports["router"]),
            SLUICE_SENDER_TARGET=sender.target,
        )
        jobs = {f"sluice-{svc}": [f"127.0.0.1:{port}"] for svc, port in ports.items()}
        async with prometheus_server(tmp_path / "prometheus", jobs) as prom:
            run = uuid.uuid4().hex[:8]
            items = traffic(run)
            async with grpc.aio.insecure_channel(ingest.target) as channel:
                stub = ingest_pb2_grpc.IngestServiceStub(channel)
                first = await stub.SubmitIntents(
                    ingest_pb2.SubmitIntentsRequest(intents=items), timeout=30
                )
                rejected = [r for r in first.results if r.HasField("error")]
                assert len(rejected) == 2, rejected
                again = await stub.SubmitIntents(
                    ingest_pb2.SubmitIntentsRequest(intents=items[:5]), timeout=30
                )
                assert not any(r.created for r in again.results)
                await stub.SubmitIntent(ingest_pb2.SubmitIntentRequest(intent=items[5]), timeout=30)

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

            # Once the queue settles, Prometheus counts the sends the database recorded.
            while True:
                sent = await pg_pool.fetchval("SELECT count(*) FROM intents WHERE status = 'sent'")
                busy = await pg_pool.fetchval(
                    "SELECT count(*) FROM intents WHERE status IN ('pending', 'leased')"
                    " AND send_at < now() + interval '10 minutes'"
                )
                scraped = await prom.value("sum(sluice_sends_total)")
                if busy == 0 and scraped == sent:
                    break
                assert time.monotonic() < deadline, (
                    f"database: {sent} sent, {busy} still due; Prometheus: {scraped} sends"
                )
                await asyncio.sleep(1)
            assert sent >= 25  # the transactional and digest mail all went out
            assert await prom.value('sum(sluice_ingest_intents_total{outcome="rejected"})') == 2
            duplicates = await prom.value('sum(sluice_ingest_intents_total{outcome="duplicate"})')
            assert duplicates == 6
            misses = await prom.value("sum(sluice_router_deadline_misses_total)")
            expired = await pg_pool.fetchval(
                "SELECT count(*) FROM intents WHERE status = 'expired'"
            )
            assert expired > 0
            assert misses == expired
