"""No open relay, no header injection: what SendBatch refuses to put on the wire.

The forged batch is the one from the security issue (a made-up "CEO" from-address, a
recipient that is not an address, CR/LF lines smuggling Bcc and Reply-To). The fuzz test
pushes 10,000 hostile messages through a real sender over gRPC into the sandbox provider and
rebuilds, for every message the provider accepted, the header block a naive wire encoder
would write: it must parse back to exactly the headers we meant, nothing injected.
"""

from __future__ import annotations

import email
import email.policy
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from sluice.common.telemetry import disabled
from sluice.sender import app
from sluice.sender.checks import MessageChecks, Refused, header_name, header_value
from sluice.sender.providers.sandbox import SandboxLedger
from sluice.sender.settings import SenderSettings
from sluice.v1 import sender_pb2, sender_pb2_grpc
from tests.conftest import REDIS_URL

PROVIDERS = """
[[providers]]
name = "fast"
kind = "sandbox"
cost_per_thousand = 0.1
intents = ["marketing"]
"""
LINE_BREAKS = [
    "\r\n",
    "\n",
    "\r",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1d",
    "\x1e",
    "\x85",
    "\u2028",
    "\u2029",
]
CHECKS = MessageChecks(frozenset({"example.com"}))
GOOD = {
    "intent_id": "0b0e7a3c-7d1e-4c55-9a57-0d5c1b0f6a11",
    "idempotency_key": "k-1",
    "recipient": "ana@example.org",
    "from_address": "Sluice <noreply@example.com>",
    "subject": "Your receipt",
}


def template(from_address: str, subject: str = "Re: {{ name }}") -> sender_pb2.TemplateContent:
    return sender_pb2.TemplateContent(
        id="forged",
        version=1,
        subject=subject,
        html_body="<p>{{ name }}</p>",
        text_body="{{ name }}",
        variables=["name"],
        from_address=from_address,
    )


@pytest.fixture
async def stub(
    tmp_path: Path, redis_prefix: str
) -> AsyncIterator[sender_pb2_grpc.SenderServiceStub]:
    providers = tmp_path / "providers.toml"
    providers.write_text(PROVIDERS)
    settings = SenderSettings(
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        providers_file=str(providers),
        sender_from_domains="example.com",
    )
    async with (
        app.running(settings, disabled(), port=0) as handle,
        grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel,
    ):
        yield sender_pb2_grpc.SenderServiceStub(channel)


def test_good_message_passes_and_each_bad_field_is_named() -> None:
    assert CHECKS.refusal(**GOOD) is None
    assert CHECKS.refusal(**GOOD, reply_to="Help <help@example.net>") is None
    assert CHECKS.refusal(**GOOD, headers=[("X-Campaign", "spring")]) is None
    cases = {
        "recipient": "not an address at all",
        "from_address": "CEO <ceo@yourbank.example>",
        "subject": "Hello\r\nBcc: victim@example.net",
        "intent_id": "i\r\nX-Evil: 1",
        "idempotency_key": "k\nX-Evil: 1",
    }
    for field, value in cases.items():
        reason = CHECKS.refusal(**{**GOOD, field: value})
        assert reason is not None, field
        assert reason.startswith(f"{field}: "), reason
    assert CHECKS.refusal(**{**GOOD, "recipient": "Ana <ana@example.org>"}) is not None
    assert CHECKS.refusal(**GOOD, reply_to="x@example.net\r\nBcc: y@example.net") is not None
    assert CHECKS.refusal(**GOOD, headers=[("Bcc", "victim@example.net")]) is not None
    assert CHECKS.refusal(**GOOD, headers=[("X-A", "1\r\nBcc: v@example.net")]) is not None
    assert CHECKS.refusal(**GOOD, tags=[("campaign", "a\nb")]) is not None
    # Encoded words decode to CR/LF inside mail libraries (see checks.py).
    smuggled = "=?utf-8?q?=0D=0ABcc:_victim@example.net?="
    assert "encoded word" in str(CHECKS.refusal(**GOOD, headers=[("X-A", smuggled)]))
    assert CHECKS.refusal(**{**GOOD, "subject": f"Re: {smuggled}"}) is not None
    assert CHECKS.refusal(**{**GOOD, "from_address": f"{smuggled} <a@example.com>"}) is not None
    # Internationalised addresses are fine; any domain is fine when no list is set.
    assert CHECKS.refusal(**{**GOOD, "recipient": "josé@exämple.com"}) is None
    assert MessageChecks().refusal(**{**GOOD, "from_address": "CEO <ceo@yourbank.example>"}) is None


@pytest.mark.parametrize(
    "name",
    [
        "Bcc",
        "To",
        "cc",
        "From",
        "Reply-To",
        "Sender",
        "Return-Path",
        "Content-Type",
        "MIME-Version",
        "X-Original-To",
        "X A",
        "X-A:",
        "",
        "X-\u00e9",
        "X-A\n",  # "$" of the old pattern matched before a trailing newline
    ],
)
def test_structural_or_malformed_header_names_are_refused(name: str) -> None:
    with pytest.raises(Refused):
        header_name(name)


def test_allow_listed_header_names_pass() -> None:
    for name in ("X-Campaign", "List-Unsubscribe", "List-Unsubscribe-Post", "Feedback-ID"):
        header_name(name)


@given(
    before=st.text(max_size=40),
    brk=st.sampled_from([*LINE_BREAKS, "\x00", "\x7f", "\x1b"]),
    after=st.text(max_size=40),
)
def test_any_control_character_or_line_separator_is_refused(
    before: str, brk: str, after: str
) -> None:
    with pytest.raises(Refused, match="control character"):
        header_value("subject", before + brk + after, 10_000)


async def test_forged_batch_sends_nothing(
    stub: sender_pb2_grpc.SenderServiceStub, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    forged = [
        ("CEO <ceo@yourbank.example>", "ana@example.org", "Ana"),
        ("noreply@example.com", "not an address at all", "Ana"),
        ("noreply@example.com", "ana@example.org\r\nBcc: victim@example.net", "Ana"),
        ("noreply@example.com\r\nReply-To: thief@example.net", "ana@example.org", "Ana"),
        ("noreply@example.com", "ana@example.org", "Ana\r\nBcc: victim@example.net"),
    ]
    replies = []
    for i, (sender, recipient, name) in enumerate(forged):
        reply = await stub.SendBatch(
            sender_pb2.SendBatchRequest(
                provider="fast",
                template=template(sender),
                messages=[
                    sender_pb2.OutboundMessage(
                        intent_id=f"made-up-{i}",
                        recipient=recipient,
                        variables={"name": name},
                        idempotency_key=f"k{i}",
                    )
                ],
            )
        )
        replies.append(reply.results[0])
    assert [r.outcome for r in replies] == [sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE] * 5
    assert [r.reason.split(":")[0:2] for r in replies] == [
        ["refused", " from_address"],
        ["refused", " recipient"],
        ["refused", " recipient"],
        ["refused", " from_address"],
        ["render", " subject contains a line break or NUL after rendering"],
    ]
    assert await SandboxLedger(redis_client, redis_prefix).sent_count("fast") == 0


# --- fuzz --------------------------------------------------------------------------------

_NASTY = [
    *LINE_BREAKS,
    "\r\nBcc: victim@example.net",
    "\nReply-To: thief@example.net",
    "\r\n\r\n<html>injected body",
    "\x00",
    "\t",
    "\x1b[31m",
    "%0d%0aBcc:victim@example.net",
    "=?utf-8?q?=0D=0ABcc:_v@example.net?=",
    "<",
    ">",
    ",",
    '"',
    ";",
    ":",
    " ",
    "@",
    "josé",
    "\u202e",
    "a" * 300,
]


def _hostile(rng: random.Random, clean: str, keep: float = 0.6) -> str:
    """The clean value (with probability ``keep``), or it with one to three nasty fragments
    spliced in."""
    if rng.random() < keep:
        return clean
    value = clean
    for _ in range(rng.randint(1, 3)):
        at = rng.randint(0, len(value))
        value = value[:at] + rng.choice(_NASTY) + value[at:]
    return value


def _injected(sender: str, recipient: str, subject: str) -> bool:
    """Whether a naive encoder's header block for these values parses back to anything but
    exactly From, To and Subject with these values: an injected header or body."""
    raw = f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n\r\nbody\r\n"
    parsed = email.message_from_string(raw, policy=email.policy.compat32)
    got = [(k, v) for k, v in parsed.items()]
    return got != [("From", sender), ("To", recipient), ("Subject", subject)] or (
        parsed.get_payload() != "body\r\n"
    )


@pytest.mark.slow
async def test_fuzz_10000_hostile_messages_inject_no_header(
    stub: sender_pb2_grpc.SenderServiceStub, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    rng = random.Random(20261201)
    sent: dict[str, tuple[str, str, str]] = {}
    total = 0
    for b in range(40):
        sender = _hostile(rng, "Sluice <noreply@example.com>", keep=0.7)
        messages = []
        for i in range(250):
            intent_id = _hostile(rng, f"fz-{b}-{i}")
            recipient = _hostile(rng, f"user{i}@example.org")
            name = _hostile(rng, f"User {i}")
            sent[intent_id] = (sender, recipient, f"Re: {name}")
            messages.append(
                sender_pb2.OutboundMessage(
                    intent_id=intent_id,
                    recipient=recipient,
                    variables={"name": name},
                    idempotency_key=_hostile(rng, f"k-{b}-{i}"),
                )
            )
        total += len(messages)
        reply = await stub.SendBatch(
            sender_pb2.SendBatchRequest(
                provider="fast", template=template(sender), messages=messages
            ),
            timeout=30,
        )
        assert len(reply.results) == len(messages)
        assert {r.outcome for r in reply.results} <= {
            sender_pb2.SEND_OUTCOME_ACCEPTED,
            sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE,
        }
    assert total == 10_000
    accepted = await SandboxLedger(redis_client, redis_prefix).sent_ids("fast")
    # The oracle must be able to fail: most generated messages would inject something.
    assert sum(_injected(*values) for values in sent.values()) > 3_000
    assert len(accepted) > 500, "the generator left almost nothing valid to send"
    injected = [sent[i] for i in accepted if _injected(*sent[i])]
    assert injected == []


@pytest.mark.parametrize("domains", ["", "example.com"])
async def test_a_sender_that_sends_any_from_domain_says_so_at_start(
    domains: str, tmp_path: Path, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    providers = tmp_path / "providers.toml"
    providers.write_text(PROVIDERS)
    settings = SenderSettings(
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        providers_file=str(providers),
        sender_from_domains=domains,
    )
    with caplog.at_level(logging.WARNING, logger="sluice.sender"):
        async with app.running(settings, disabled(), port=0):
            pass
    warned = [r for r in caplog.records if "SLUICE_SENDER_FROM_DOMAINS" in r.getMessage()]
    assert len(warned) == (0 if domains else 1)
