"""One trace from the submitting call to the provider, across the three services in-process.

Each service gets its own Telemetry (its own TracerProvider and in-memory exporter), the
way three processes would; the only thing that carries the trace from ingest to the router
is the ``traceparent`` stored with the intent, and from the router to the sender the one
each ``OutboundMessage`` carries.

The shape asserted here (one intent, tracing on everywhere)::

    intent trace                                   dispatch trace (one per leased batch)
    test.submit                 (client, test)     sluice.dispatch            (router)
    └ /IngestService/SubmitIntent  CLIENT          └ /SenderService/SendBatch  CLIENT
      └ /IngestService/SubmitIntent SERVER (ingest)  └ /SenderService/SendBatch SERVER (sender)
        └ sluice.route      (router) ---link---> sluice.dispatch
          └ sluice.send     (sender)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sluice.cli.stack_settings import StackSettings
from sluice.common.telemetry import Telemetry, disabled, setup_tracing
from sluice.ingest.app import running as ingest_running
from sluice.router.app import running as router_running
from sluice.sender.app import running as sender_running
from sluice.sender.providers.sandbox import sandbox_key
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, intent_pb2
from tests.conftest import REDIS_URL, InsertTemplate

# Unlimited sandboxes: the test is about the trace, not about throttling.
PROVIDERS_TOML = """
[[providers]]
name = "cheap"
kind = "sandbox"
cost_per_thousand = 0.10
sustained_rate = 0
burst = 0
intents = ["marketing", "digest"]

[[providers]]
name = "dear"
kind = "sandbox"
cost_per_thousand = 0.30
sustained_rate = 0
burst = 0
intents = ["transactional", "marketing"]
"""

SUBMIT = "/sluice.v1.IngestService/SubmitIntent"
SEND_BATCH = "/sluice.v1.SenderService/SendBatch"


@pytest.fixture
def settings(pg_dsn: str, redis_prefix: str, tmp_path: Path) -> StackSettings:
    providers = tmp_path / "providers.toml"
    providers.write_text(PROVIDERS_TOML, encoding="utf-8")
    return StackSettings.of(
        database_url=pg_dsn,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        providers_file=str(providers),
        router_concurrency=1,
        router_idle_sleep=0.02,
        lease_seconds=5.0,
        sender_timeout_seconds=2.0,
        shutdown_grace_seconds=0.5,
        db_pool_size=4,
    )


@pytest.fixture
async def template(insert_template: InsertTemplate) -> str:
    return await insert_template("welcome")


@pytest.fixture
async def sandbox_cleanup(redis_prefix: str) -> AsyncIterator[None]:
    """Removes the sandbox's records under this test's prefix afterwards."""
    yield
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@dataclasses.dataclass
class Traced:
    """One service's Telemetry and the exporter its spans land in."""

    telemetry: Telemetry
    exporter: InMemorySpanExporter

    def spans(self) -> tuple[ReadableSpan, ...]:
        # BatchSpanProcessor exports from a thread; flush so every ended span is in.
        assert self.telemetry.provider is not None
        assert self.telemetry.provider.force_flush(5_000)
        return self.exporter.get_finished_spans()


@contextlib.contextmanager
def traced(*names: str) -> Iterator[dict[str, Traced]]:
    out: dict[str, Traced] = {}
    for name in names:
        exporter = InMemorySpanExporter()
        out[name] = Traced(setup_tracing(name, span_exporter=exporter), exporter)
    try:
        yield out
    finally:
        for t in out.values():
            t.telemetry.shutdown()


@contextlib.asynccontextmanager
async def trio(
    settings: StackSettings, ingest: Telemetry, router: Telemetry, sender: Telemetry
) -> AsyncIterator[int]:
    """Runs sender, router (pointed at that sender) and ingest; yields ingest's port.

    Started outside any span on purpose: the router's workers are tasks that copy the
    context they are created in, and must not run inside the test's client span.
    """
    async with sender_running(settings.sender, sender, port=0) as sender_handle:
        router_settings = dataclasses.replace(
            settings.router, sender_target=f"127.0.0.1:{sender_handle.port}"
        )
        async with (
            router_running(router_settings, router, port=0),
            ingest_running(settings.ingest, ingest, port=0) as ingest_handle,
        ):
            yield ingest_handle.port


def submission(key: str) -> ingest_pb2.SubmitIntentRequest:
    return ingest_pb2.SubmitIntentRequest(
        intent=intent_pb2.IntentSubmission(
            idempotency_key=key,
            campaign_id="trace",
            recipient="alice@example.com",
            intent=intent_pb2.INTENT_MARKETING,
            template_id="welcome",
            variables={"name": "Alice"},
        )
    )


async def wait_until_sent(pool: asyncpg.Pool, intent_id: uuid.UUID, within: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    status = None
    while asyncio.get_running_loop().time() < deadline:
        status = await pool.fetchval("SELECT status FROM intents WHERE id = $1", intent_id)
        if status == "sent":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"intent {intent_id} is {status!r}, not sent, after {within} s")


def only(spans: Sequence[ReadableSpan], name: str, **attributes: object) -> ReadableSpan:
    found = [
        s
        for s in spans
        if s.name == name and all((s.attributes or {}).get(k) == v for k, v in attributes.items())
    ]
    assert len(found) == 1, f"{len(found)} spans named {name} with {attributes}: {spans}"
    return found[0]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def ancestors(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> list[int]:
    """Span ids from ``span``'s parent up to its trace's root, through the given spans."""
    by_id = {s.context.span_id: s for s in spans}
    chain: list[int] = []
    current: ReadableSpan | None = span
    while current is not None and current.parent is not None:
        chain.append(current.parent.span_id)
        current = by_id.get(current.parent.span_id)
    return chain


async def test_one_trace_runs_from_submit_through_router_to_sender(
    settings: StackSettings, pg_pool: asyncpg.Pool, template: str, sandbox_cleanup: None
) -> None:
    with traced("client", "ingest", "router", "sender") as t:
        async with trio(
            settings, t["ingest"].telemetry, t["router"].telemetry, t["sender"].telemetry
        ) as port:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", interceptors=t["client"].telemetry.client_interceptors()
            ) as channel:
                stub = ingest_pb2_grpc.IngestServiceStub(channel)
                with t["client"].telemetry.tracer.start_as_current_span("test.submit") as root:
                    response = await stub.SubmitIntent(submission("trace-1"))
            intent_id = uuid.UUID(response.intent.id)
            await wait_until_sent(pg_pool, intent_id)
            stored = await pg_pool.fetchval(
                "SELECT traceparent FROM intents WHERE id = $1", intent_id
            )
            delivered = await pg_pool.fetchval(
                "SELECT provider_message_id FROM intents WHERE id = $1", intent_id
            )
            client_spans = t["client"].spans()
            ingest_spans = t["ingest"].spans()
            router_spans = t["router"].spans()
            sender_spans = t["sender"].spans()

    trace_id = root.get_span_context().trace_id
    client_call = only(client_spans, SUBMIT)
    submit = only(ingest_spans, SUBMIT)
    route = only(router_spans, "sluice.route", **{"sluice.intent_id": str(intent_id)})
    send = only(sender_spans, "sluice.send", **{"sluice.intent_id": str(intent_id)})

    # One trace: the client's span, ingest's server span, the route and the send.
    assert {s.context.trace_id for s in (client_call, submit, route, send)} == {trace_id}
    assert client_call.kind == trace.SpanKind.CLIENT
    assert parent_id(client_call) == root.get_span_context().span_id
    assert submit.kind == trace.SpanKind.SERVER
    assert submit.parent is not None
    assert submit.parent.is_remote
    assert parent_id(submit) == client_call.context.span_id

    # What ingest stored is the SubmitIntent server span's own context (flags: sampled, and
    # whatever else this SDK sets, such as W3C level 2's random-trace-id bit).
    flags = int(submit.context.trace_flags)
    assert flags & trace.TraceFlags.SAMPLED
    assert stored == f"00-{trace_id:032x}-{submit.context.span_id:016x}-{flags:02x}"

    # The route span is a direct child of that stored context (remote: it came from the
    # database, not from an in-process parent), so its chain reaches ingest and the client.
    assert route.parent is not None
    assert route.parent.is_remote
    assert parent_id(route) == submit.context.span_id
    everything = [*client_spans, *ingest_spans, *router_spans, *sender_spans]
    chain = ancestors(send, everything)
    assert chain[:4] == [
        route.context.span_id,
        submit.context.span_id,
        client_call.context.span_id,
        root.get_span_context().span_id,
    ]
    assert (route.attributes or {})["sluice.provider"] == "cheap"
    assert (route.attributes or {})["sluice.status"] == "sent"
    assert (route.attributes or {})["sluice.provider_message_id"] == delivered
    assert route.status.is_ok

    # The send span's parent is the route span itself (the traceparent the router put on
    # the OutboundMessage), not the SendBatch server span: a batch carries many intents of
    # many traces, so the per-intent spans hang off their own intent's trace.
    assert send.parent is not None
    assert parent_id(send) == route.context.span_id
    assert (send.attributes or {})["sluice.provider"] == "cheap"

    # The batch machinery is its own trace: dispatch -> SendBatch client -> SendBatch server;
    # the route span links to the dispatch span so one can jump from one to the other.
    dispatch = only(router_spans, "sluice.dispatch")
    batch_client = only(router_spans, SEND_BATCH)
    batch_server = only(sender_spans, SEND_BATCH)
    assert dispatch.context.trace_id != trace_id
    assert dispatch.parent is None
    assert parent_id(batch_client) == dispatch.context.span_id
    assert batch_client.kind == trace.SpanKind.CLIENT
    assert parent_id(batch_server) == batch_client.context.span_id
    assert batch_server.context.trace_id == dispatch.context.trace_id
    assert [link.context.span_id for link in route.links] == [dispatch.context.span_id]
    # The send span ran inside the SendBatch handler and ended before it answered.
    assert send.start_time is not None
    assert batch_server.start_time is not None
    assert send.end_time is not None
    assert batch_server.end_time is not None
    assert batch_server.start_time <= send.start_time
    assert send.end_time <= batch_server.end_time

    # Each service's spans carry its own service name.
    for spans, name in (
        (ingest_spans, "sluice-ingest"),
        (router_spans, "sluice-router"),
        (sender_spans, "sluice-sender"),
    ):
        assert {s.resource.attributes["service.name"] for s in spans} == {name}


async def test_without_a_client_span_the_ingest_server_span_is_the_root(
    settings: StackSettings, pg_pool: asyncpg.Pool, template: str, sandbox_cleanup: None
) -> None:
    with traced("ingest", "router", "sender") as t:
        async with (
            trio(
                settings, t["ingest"].telemetry, t["router"].telemetry, t["sender"].telemetry
            ) as port,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            response = await ingest_pb2_grpc.IngestServiceStub(channel).SubmitIntent(
                submission("trace-2")
            )
            intent_id = uuid.UUID(response.intent.id)
            await wait_until_sent(pg_pool, intent_id)
            ingest_spans = t["ingest"].spans()
            router_spans = t["router"].spans()
            sender_spans = t["sender"].spans()

    submit = only(ingest_spans, SUBMIT)
    route = only(router_spans, "sluice.route", **{"sluice.intent_id": str(intent_id)})
    send = only(sender_spans, "sluice.send", **{"sluice.intent_id": str(intent_id)})
    assert submit.parent is None
    assert route.context.trace_id == submit.context.trace_id == send.context.trace_id
    assert parent_id(route) == submit.context.span_id
    assert parent_id(send) == route.context.span_id


async def test_tracing_off_installs_nothing_and_stores_no_traceparent(
    settings: StackSettings,
    pg_pool: asyncpg.Pool,
    template: str,
    redis_prefix: str,
    sandbox_cleanup: None,
) -> None:
    off = setup_tracing("ingest", "none")
    assert not off.enabled
    assert off.provider is None
    assert off.server_interceptors() == []
    assert off.client_interceptors() == []
    assert isinstance(off.tracer, trace.NoOpTracer)
    assert disabled().server_interceptors() == []

    # A caller that does trace sends a traceparent; with tracing off ingest has no
    # interceptor to read it, so nothing is stored and the router has nothing to join.
    with traced("client") as t:
        async with trio(settings, off, disabled(), disabled()) as port:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", interceptors=t["client"].telemetry.client_interceptors()
            ) as channel:
                stub = ingest_pb2_grpc.IngestServiceStub(channel)
                with t["client"].telemetry.tracer.start_as_current_span("test.submit"):
                    response = await stub.SubmitIntent(submission("untraced-1"))
            intent_id = uuid.UUID(response.intent.id)
            await wait_until_sent(pg_pool, intent_id)
        client_spans = t["client"].spans()

    assert only(client_spans, SUBMIT).kind == trace.SpanKind.CLIENT  # the header did go out
    # Validation turns the empty traceparent into NULL, so the column says "none" plainly.
    stored = await pg_pool.fetchval("SELECT traceparent FROM intents WHERE id = $1", intent_id)
    assert stored is None
    # And the mail still went out: tracing is observation, never a dependency.
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        assert int(await client.get(sandbox_key(redis_prefix, "cheap", "count")) or 0) == 1
    finally:
        await client.aclose()
