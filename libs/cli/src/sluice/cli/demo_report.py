"""The demo's numbers and its summary: queue stats folded into counts, the result of a run,
and the tables printed at the end."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sluice.cli.demo_campaign import SubmitReport
from sluice.common.model import PROTO_TO_KIND, PROTO_TO_STATUS
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, intent_pb2, router_pb2

OPEN_STATUSES = ("pending", "leased")


@dataclass
class QueueSnapshot:
    """One GetQueueStats answer for the campaign, folded into plain counts."""

    by_status: Counter[str]
    by_provider: dict[str, Counter[str]]
    by_intent: Counter[str]

    @property
    def total(self) -> int:
        """Intents of the campaign in any status."""
        return sum(self.by_status.values())

    @property
    def open(self) -> int:
        """Intents still waiting for a router or being sent."""
        return sum(self.by_status[s] for s in OPEN_STATUSES)


@dataclass
class DemoResult:
    """Everything the summary shows; returned so tests can check the numbers."""

    campaign: str
    requested: int
    submit: SubmitReport
    final: QueueSnapshot
    sent_before: int
    elapsed: float
    timed_out: bool
    costs: dict[str, float]
    routing: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        """Intents of the campaign a provider accepted (any run)."""
        return self.final.by_status["sent"] + self.final.by_status["delivered"]

    @property
    def throughput(self) -> float:
        """Emails per second sent during this run."""
        sent_now = self.sent - self.sent_before
        return sent_now / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def cost_per_thousand(self) -> float:
        """Average provider cost per 1,000 sent messages, in US dollars."""
        sent = self.sent_by_provider()
        total = sum(sent.values())
        if not total:
            return 0.0
        return sum(n * self.costs.get(p, 0.0) for p, n in sent.items()) / total

    def sent_by_provider(self) -> dict[str, int]:
        """Sent (or delivered) messages per provider."""
        return {
            provider: counts["sent"] + counts["delivered"]
            for provider, counts in self.final.by_provider.items()
            if counts["sent"] + counts["delivered"]
        }

    @property
    def exit_code(self) -> int:
        """0 when nothing of the campaign is left open, 1 when the timeout hit first."""
        return 1 if self.timed_out else 0


def fold_stats(response: router_pb2.GetQueueStatsResponse) -> QueueSnapshot:
    """Counts by status, by provider and status, and by intent kind."""
    by_status: Counter[str] = Counter()
    by_provider: dict[str, Counter[str]] = defaultdict(Counter)
    by_intent: Counter[str] = Counter()
    for row in response.counts:
        status = PROTO_TO_STATUS.get(int(row.status), "unspecified")
        by_status[status] += row.count
        by_intent[PROTO_TO_KIND.get(int(row.intent), "unspecified")] += row.count
        if row.provider:
            by_provider[row.provider][status] += row.count
    return QueueSnapshot(by_status, dict(by_provider), by_intent)


async def failure_lines(ingest: ingest_pb2_grpc.IngestServiceAsyncStub, campaign: str) -> list[str]:
    """A line for each of the campaign's first few failed intents: recipient and reason."""
    response: ingest_pb2.ListIntentsResponse = await ingest.ListIntents(
        ingest_pb2.ListIntentsRequest(
            campaign_id=campaign, status=intent_pb2.INTENT_STATUS_FAILED, page_size=5
        ),
        timeout=10,
    )
    return [
        f"failed: {i.recipient} via {i.provider or '-'}: {i.last_error or 'no reason given'}"
        for i in response.intents
    ]


def print_summary(result: DemoResult, console: Console, failures: Sequence[str] = ()) -> None:
    """The summary tables: statuses, providers, throughput and cost."""
    console.print()
    console.print(f"[bold]summary of campaign {escape(result.campaign)}[/]", highlight=False)
    statuses = Table()
    statuses.add_column("status")
    statuses.add_column("intents", justify="right")
    for status, n in sorted(result.final.by_status.items(), key=lambda kv: -kv[1]):
        if n:
            statuses.add_row(status, str(n))
    statuses.add_row("rejected at ingest", str(len(result.submit.rejected)))
    statuses.add_row("[bold]submitted[/]", f"[bold]{result.requested}[/]")
    console.print(statuses)
    for line in failures:
        console.print(f"  {line}", highlight=False, markup=False)

    providers = Table()
    providers.add_column("provider")
    providers.add_column("sent", justify="right")
    providers.add_column("failed", justify="right")
    providers.add_column("$ per 1,000", justify="right")
    providers.add_column("cost $", justify="right")
    for name in sorted(set(result.final.by_provider) | set(result.costs)):
        counts = result.final.by_provider.get(name, Counter())
        sent = counts["sent"] + counts["delivered"]
        cost = result.costs.get(name, 0.0)
        providers.add_row(
            name, str(sent), str(counts["failed"]), f"{cost:.2f}", f"{sent * cost / 1000:.4f}"
        )
    console.print(providers)
    if result.routing:
        console.print(
            "why: the routing policy's plan for this campaign from an empty queue "
            "(cheapest provider that still meets each deadline):",
            highlight=False,
        )
        for line in result.routing:
            console.print(f"  {line}", highlight=False, markup=False)

    sent_now = result.sent - result.sent_before
    lines = [
        f"elapsed      {result.elapsed:.1f} s (submit {result.submit.seconds:.2f} s)",
        (
            f"throughput   {result.throughput:.1f} emails/s ({sent_now} sent in this run)"
            if sent_now
            else "throughput   - (nothing new to send: this campaign was already sent)"
        ),
        f"cost         ${result.cost_per_thousand:.3f} per 1,000 sends on average",
    ]
    if result.timed_out:
        lines.append(
            f"[bold red]timed out[/] with {result.final.open} intents still pending or leased"
        )
    for line in lines:
        console.print(line, highlight=False)


def status_name(code: int) -> str:
    """``3`` -> ``INVALID_ARGUMENT``."""
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return str(code)
