"""A submitted reply-to, custom header and tag reach the wire, through the real trio.

``sluice serve ingest``, ``router`` and ``sender`` run as processes; the sender's providers
are a Resend stand-in (HTTP, tests/fakes/resend_fake.py) for transactional mail and an
aiosmtpd sink for marketing mail, both in this test's process. Each intent is submitted
over real gRPC with a reply-to, an ``X-`` header and a tag, and the test reads what each
stand-in received: Resend's JSON fields, and the SMTP message's headers.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import grpc
import pytest

from sluice.v1 import ingest_pb2, ingest_pb2_grpc, intent_pb2
from tests.conftest import InsertTemplate
from tests.e2e.e2e_stack import service_stack
from tests.fakes.resend_fake import FakeResend
from tests.fakes.smtp_fake import SmtpSink

pytestmark = pytest.mark.e2e

PROVIDERS = """
[[providers]]
name = "resend"
kind = "resend"
cost_per_thousand = 0.4
sustained_rate = 0
burst = 0
intents = ["transactional"]
[providers.settings]
api_key_file = "{key_file}"
base_url = "{resend}"

[[providers]]
name = "relay"
kind = "smtp"
cost_per_thousand = 0.1
sustained_rate = 0
burst = 0
intents = ["marketing"]
[providers.settings]
host = "127.0.0.1"
port = {smtp}
tls = "none"
"""
WAIT_SECONDS = 60.0


def submission(key: str, kind: intent_pb2.Intent.ValueType) -> intent_pb2.IntentSubmission:
    return intent_pb2.IntentSubmission(
        idempotency_key=key,
        recipient=f"{key}@example.com",
        intent=kind,
        template_id="welcome",
        variables={"name": "Ana"},
        reply_to="Help@Bücher.de",  # stored, and sent, as Help@xn--bcher-kva.de
        headers={"X-Campaign": "spring-2026"},
        tags={"cohort": "b-2"},
    )


async def wait_sent(pool: asyncpg.Pool, count: int) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        statuses = [r["s"] for r in await pool.fetch("SELECT status::text AS s FROM intents")]
        if statuses.count("sent") == count:
            return
        assert set(statuses) <= {"pending", "leased", "sent"}, statuses
        assert time.monotonic() < deadline, f"not sent after {WAIT_SECONDS} s: {statuses}"
        await asyncio.sleep(0.2)


async def test_reply_to_header_and_tag_reach_resend_and_smtp(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    redis_prefix: str,
    insert_template: InsertTemplate,
    tmp_path: Path,
) -> None:
    await insert_template("welcome")
    key_file = tmp_path / "resend_key"
    key_file.write_text("re_e2e\n")
    async with FakeResend(api_key="re_e2e") as resend, SmtpSink() as sink:
        providers = PROVIDERS.format(key_file=key_file, resend=resend.url, smtp=sink.port)
        async with service_stack(
            database_url=pg_dsn,
            redis_prefix=redis_prefix,
            log_dir=tmp_path / "logs",
            providers_toml=providers,
        ) as stack:
            ingest, sender = await asyncio.gather(stack.start("ingest"), stack.start("sender"))
            await stack.start("router", SLUICE_SENDER_TARGET=sender.target)
            async with grpc.aio.insecure_channel(ingest.target) as channel:
                stub = ingest_pb2_grpc.IngestServiceStub(channel)
                answer = await stub.SubmitIntents(
                    ingest_pb2.SubmitIntentsRequest(
                        intents=[
                            submission("tx", intent_pb2.INTENT_TRANSACTIONAL),
                            submission("mk", intent_pb2.INTENT_MARKETING),
                        ]
                    ),
                    timeout=30,
                )
                assert all(r.created for r in answer.results), answer
                tx_id, mk_id = (r.intent_id for r in answer.results)
                await wait_sent(pg_pool, 2)
                got = await stub.GetIntent(ingest_pb2.GetIntentRequest(id=tx_id))
                assert got.intent.provider == "resend"
                assert got.intent.reply_to == "Help@xn--bcher-kva.de"

    # Resend: reply_to, headers and tags in its JSON, the intent id tag added by the sender.
    [email] = resend.emails
    assert email["to"] == ["tx@example.com"]
    assert email["reply_to"] == ["Help@xn--bcher-kva.de"]
    assert email["headers"] == {"X-Campaign": "spring-2026"}
    assert {t["name"]: t["value"] for t in email["tags"]} == {
        "sluice_intent_id": tx_id,
        "cohort": "b-2",
    }
    # SMTP: the headers of the message as the sink received it.
    [received] = sink.received
    assert received.rcpt_tos == ["mk@example.com"]
    message = received.message
    assert message["Reply-To"] == "Help@xn--bcher-kva.de"
    assert message["X-Campaign"] == "spring-2026"
    assert message["Message-ID"] == f"<{mk_id}@example.com>"
