"""``sluice demo``: a sample mixed campaign through a stack, with progress and a summary.

The demo is a plain gRPC client: it submits with ``IngestService.SubmitIntents`` and
watches ``RouterService.GetQueueStats`` for its campaign, so it works the same against
``sluice dev``, a cluster, or the stack it starts itself when nothing answers.

Every item of a campaign is a pure function of (campaign id, index): the idempotency key is
``<campaign>/<index>`` and the payload never changes, so re-running a campaign is a retry
that ingest recognises ("0 new, N existing"), never a conflicting reuse of a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from sluice.common.model import KIND_TO_PROTO, PROTO_TO_KIND, PROTO_TO_STATUS
from sluice.common.settings import Settings
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, intent_pb2, router_pb2, router_pb2_grpc

DEFAULT_INGEST = "127.0.0.1:50051"
DEFAULT_ROUTER_PORT = 50052
SUBMIT_BATCH = 100  # small enough to show submission progress, large enough to be quick
POLL_SECONDS = 0.5
PLAIN_EVERY_SECONDS = 2.0
OPEN_STATUSES = ("pending", "leased")

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
    return intent_pb2.IntentSubmission(
        idempotency_key=f"{campaign}/{index}",
        campaign_id=campaign,
        recipient=recipient,
        intent=KIND_TO_PROTO[kind],
        template_id=TEMPLATE_FOR[kind],
        variables=variables,
    )


def campaign_items(campaign: str, count: int) -> list[intent_pb2.IntentSubmission]:
    """The first ``count`` items of ``campaign``."""
    return [campaign_item(campaign, i) for i in range(count)]


def new_campaign_id() -> str:
    """A fresh, readable campaign id."""
    return f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


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


async def answers_health(target: str, probe_seconds: float = 1.0) -> bool:
    """True when a gRPC server at ``target`` says SERVING."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=probe_seconds
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


class _ProgressView:
    """A live bar on a terminal; a line every few seconds otherwise (CI logs)."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.total = total
        self.interactive = console.is_terminal
        self.started = time.perf_counter()
        self.last_line = 0.0
        self.progress: Progress | None = None
        self.task_id: TaskID | None = None

    def __enter__(self) -> _ProgressView:
        if self.interactive:
            self.progress = Progress(
                TextColumn("[bold]sending"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[detail]}"),
                console=self.console,
            )
            self.progress.start()
            self.task_id = self.progress.add_task("send", total=self.total, detail="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, snap: QueueSnapshot, *, final: bool = False) -> None:
        done = snap.total - snap.open
        detail = ", ".join(f"{s} {n}" for s, n in sorted(snap.by_status.items()) if n)
        if self.progress is not None and self.task_id is not None:
            self.progress.update(self.task_id, completed=done, detail=detail)
            return
        now = time.perf_counter()
        if final or now - self.last_line >= PLAIN_EVERY_SECONDS:
            self.last_line = now
            self.console.print(
                f"  [{now - self.started:5.1f} s] {done}/{snap.total} done "
                f"({detail or 'none yet'})",
                highlight=False,
            )


async def watch_campaign(
    router: router_pb2_grpc.RouterServiceAsyncStub,
    campaign: str,
    *,
    expected: int,
    deadline: float,
    console: Console,
) -> tuple[QueueSnapshot, bool]:
    """Polls the campaign's queue stats until nothing is open or ``deadline`` passes.

    Returns the last snapshot and whether the deadline hit first.
    """
    request = router_pb2.GetQueueStatsRequest(campaign_id=campaign)
    with _ProgressView(console, expected) as view:
        while True:
            response: router_pb2.GetQueueStatsResponse = await router.GetQueueStats(
                request, timeout=10
            )
            snap = fold_stats(response)
            if snap.open == 0:
                view.update(snap, final=True)
                return snap, False
            if time.perf_counter() >= deadline:
                view.update(snap, final=True)
                return snap, True
            view.update(snap)
            await asyncio.sleep(POLL_SECONDS)


async def run_demo(
    ingest_target: str,
    router_target: str,
    *,
    count: int,
    campaign: str,
    wait_seconds: float,
    console: Console,
) -> DemoResult:
    """Submits the campaign, waits for it, prints the summary and returns its numbers."""
    async with (
        grpc.aio.insecure_channel(ingest_target) as ingest_channel,
        grpc.aio.insecure_channel(router_target) as router_channel,
    ):
        # grpc has no type stubs, so mypy cannot pick the aio overload of the stub itself.
        ingest = cast(
            "ingest_pb2_grpc.IngestServiceAsyncStub",
            ingest_pb2_grpc.IngestServiceStub(ingest_channel),
        )
        router = cast(
            "router_pb2_grpc.RouterServiceAsyncStub",
            router_pb2_grpc.RouterServiceStub(router_channel),
        )
        providers: router_pb2.ListProvidersResponse = await router.ListProviders(
            router_pb2.ListProvidersRequest(), timeout=10
        )
        costs = {p.name: p.cost_per_thousand for p in providers.providers}
        before: router_pb2.GetQueueStatsResponse = await router.GetQueueStats(
            router_pb2.GetQueueStatsRequest(campaign_id=campaign), timeout=10
        )
        already = fold_stats(before).by_status
        sent_before = already["sent"] + already["delivered"]

        console.print(
            f"campaign [bold]{escape(campaign)}[/]: {count} intents to {ingest_target} "
            f"(router {router_target})"
        )
        started = time.perf_counter()
        items = campaign_items(campaign, count)
        report = await submit_campaign(ingest, items, rpc_seconds=30)
        console.print(
            f"submitted in {report.seconds:.2f} s: [bold]{report.created} new, "
            f"{report.existing} existing, {len(report.rejected)} rejected[/]",
            highlight=False,
        )
        for rej in report.rejected:
            why = "; ".join(f"{f}: {d}" for f, d in rej.violations) or rej.message
            console.print(
                f"  rejected #{rej.index} {rej.recipient!r}: {status_name(rej.code)}: {why}",
                highlight=False,
                markup=False,
            )
        final, timed_out = await watch_campaign(
            router,
            campaign,
            expected=report.accepted,
            deadline=started + wait_seconds,
            console=console,
        )
        elapsed = time.perf_counter() - started
        failures = await failure_lines(ingest, campaign) if final.by_status["failed"] else []
    result = DemoResult(
        campaign=campaign,
        requested=count,
        submit=report,
        final=final,
        sent_before=sent_before,
        elapsed=elapsed,
        timed_out=timed_out,
        costs=costs,
    )
    print_summary(result, console, failures)
    return result


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


def router_target_for(ingest_target: str) -> str:
    """The router beside an ingest at ``host:port``: same host, port 50052."""
    host, _, _ = ingest_target.rpartition(":")
    return f"{host or '127.0.0.1'}:{DEFAULT_ROUTER_PORT}"


def run_demo_command(
    *,
    count: int,
    target: str | None,
    router: str | None,
    campaign: str | None,
    timeout: float,
    state_dir: str,
) -> int:
    """``sluice demo``: use the given or local stack, or start one for the run."""
    try:
        return asyncio.run(
            _demo_main(
                count=count,
                target=target,
                router=router,
                campaign=campaign or new_campaign_id(),
                wait_seconds=timeout,
                state_dir=Path(state_dir),
            )
        )
    except grpc.aio.AioRpcError as exc:
        print(f"sluice demo: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


async def _demo_main(
    *,
    count: int,
    target: str | None,
    router: str | None,
    campaign: str,
    wait_seconds: float,
    state_dir: Path,
) -> int:
    from sluice.cli.dev import local_stack, run_stoppable
    from sluice.cli.serve import configure_logging

    # soft_wrap: status lines stay whole in CI logs (no terminal, so no width to fit).
    console = Console(soft_wrap=True)
    if target is None and await answers_health(DEFAULT_INGEST):
        target = DEFAULT_INGEST
        console.print(f"using the stack answering on {target}")
    if target is not None:
        result = await run_demo(
            target,
            router or router_target_for(target),
            count=count,
            campaign=campaign,
            wait_seconds=wait_seconds,
            console=console,
        )
        return result.exit_code

    settings = Settings.from_env()
    # The services' INFO lines would tear through the progress display; warnings still show.
    configure_logging(settings, level="WARNING")

    def say(message: str) -> None:
        console.print(f"[dim]{message}[/]", highlight=False)

    async def body(stop: asyncio.Event, ready: asyncio.Event) -> int:
        say("no stack answers on 127.0.0.1:50051: starting one for this demo")
        async with local_stack(settings, state_dir=state_dir, any_ports=True, say=say) as stack:
            ready.set()
            demo = asyncio.create_task(
                run_demo(
                    stack.ingest,
                    stack.router,
                    count=count,
                    campaign=campaign,
                    wait_seconds=wait_seconds,
                    console=console,
                )
            )
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({demo, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not demo.done():
                demo.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await demo
                say("interrupted: stopping the stack")
                return 130
            return demo.result().exit_code

    return await run_stoppable(body)
