"""The demo's campaign: its items, each a pure function of (campaign id, index), and their
submission to ingest in batches."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from sluice.cli.demo_spill import SPILL_KINDS, campaign_deadline
from sluice.common.model import KIND_TO_PROTO
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, intent_pb2

SUBMIT_BATCH = 100  # small enough to show submission progress, large enough to be quick

# The sandbox provider fails every message to this domain permanently (see
# sluice.sender.providers.sandbox), which shows a permanent failure end to end.
FAIL_RECIPIENT = "bounce@fail.sandbox.example"

# Deliberate oddities, at fixed indices so the same campaign always has them in the same place.
SPECIALS: dict[int, tuple[str, str]] = {
    3: ("marketing", "no-at-sign.example.com"),  # rejected: INVALID_ARGUMENT
    7: ("transactional", FAIL_RECIPIENT),  # accepted, then a permanent failure
    11: ("marketing", "josé@exämple.com"),  # internationalised: accepted
    13: ("digest", "two@@example.com"),  # rejected: INVALID_ARGUMENT
    17: ("transactional", "søren@bücher.example.org"),  # internationalised: accepted
    19: ("marketing", "用户@例子.广告"),  # internationalised: accepted
}
NAMES = ("Ada", "Grace", "Zoë", "José", "Łukasz", "Søren", "Amara", "Hiroshi", "Fatima", "Liam")
DOMAINS = ("example.com", "example.org", "example.net", "mail.example.com")
TEMPLATE_FOR = {"transactional": "welcome", "digest": "weekly-digest", "marketing": "spring-sale"}


def kind_for(index: int) -> str:
    """20 % transactional, 20 % digest, 60 % marketing, interleaved."""
    slot = index % 10
    if slot in (0, 5):
        return "transactional"
    if slot in (2, 8):
        return "digest"
    return "marketing"


def campaign_item(campaign: str, index: int) -> intent_pb2.IntentSubmission:
    """Item ``index`` of ``campaign``: the same inputs always give the same submission."""
    rng = random.Random(f"{campaign}/{index}")
    kind, recipient = SPECIALS.get(index, (kind_for(index), ""))
    name = rng.choice(NAMES)
    if not recipient:
        recipient = f"{name.lower()}.{index:05d}@{rng.choice(DOMAINS)}"
    variables = {"name": name}
    if kind == "digest":
        variables["count"] = str(rng.randint(1, 40))
    elif kind == "marketing":
        variables["discount"] = f"{rng.choice((10, 15, 20, 25, 30))}%"
    submission = intent_pb2.IntentSubmission(
        idempotency_key=f"{campaign}/{index}",
        campaign_id=campaign,
        recipient=recipient,
        intent=KIND_TO_PROTO[kind],
        template_id=TEMPLATE_FOR[kind],
        variables=variables,
    )
    deadline = campaign_deadline(campaign) if kind in SPILL_KINDS else None
    if deadline is not None:
        submission.deadline.FromDatetime(deadline)
    return submission


def campaign_items(campaign: str, count: int) -> list[intent_pb2.IntentSubmission]:
    """The first ``count`` items of ``campaign``."""
    return [campaign_item(campaign, i) for i in range(count)]


@dataclass
class Rejection:
    """One item ingest refused, with its field violations."""

    index: int
    recipient: str
    code: int
    message: str
    violations: list[tuple[str, str]]


@dataclass
class SubmitReport:
    """What SubmitIntents answered for the whole campaign."""

    created: int = 0
    existing: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def accepted(self) -> int:
        """Items stored, now or by an earlier run."""
        return self.created + self.existing


def _batches(
    items: Sequence[intent_pb2.IntentSubmission],
) -> Iterator[tuple[int, list[intent_pb2.IntentSubmission]]]:
    for start in range(0, len(items), SUBMIT_BATCH):
        yield start, list(items[start : start + SUBMIT_BATCH])


async def submit_campaign(
    ingest: ingest_pb2_grpc.IngestServiceAsyncStub,
    items: Sequence[intent_pb2.IntentSubmission],
    *,
    rpc_seconds: float,
) -> SubmitReport:
    """Submits ``items`` in batches; counts new, existing and rejected items."""
    report = SubmitReport()
    started = time.perf_counter()
    for start, batch in _batches(items):
        request = ingest_pb2.SubmitIntentsRequest(intents=batch)
        response: ingest_pb2.SubmitIntentsResponse = await ingest.SubmitIntents(
            request, timeout=rpc_seconds
        )
        for offset, result in enumerate(response.results):
            if result.intent_id:
                if result.created:
                    report.created += 1
                else:
                    report.existing += 1
            else:
                report.rejected.append(
                    Rejection(
                        index=start + offset,
                        recipient=batch[offset].recipient,
                        code=result.error.code,
                        message=result.error.message,
                        violations=[
                            (v.field, v.description) for v in result.error.field_violations
                        ],
                    )
                )
    report.seconds = time.perf_counter() - started
    return report
