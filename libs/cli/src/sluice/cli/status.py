"""``sluice status``: the queue, the providers and the throughput of a running stack, for an
operator at a terminal.

Everything comes from the services' own operator RPCs, so it works wherever grpcurl would:
the router's ``GetQueueStats`` (counts by status and kind, due work, the oldest due age) and
``ListProviders`` (health, success rate, cost, limits), and the sender's ``GetCapacity``
(limiter headroom, shared by every sender through Redis). Throughput and spend are the
change in sent counts between two refreshes, so a single snapshot (``--once``) shows totals
only. ``GetQueueStats`` counts the whole intents table, hence a refresh every few seconds,
not many a second. A sender that does not answer leaves the headroom columns empty instead
of failing the view; a router that does not answer is an error (exit 1), since nothing else
is known.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from rich import box
from rich.console import Console, Group, JustifyMethod
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from sluice.cli.demo import TOKEN_VARIABLE
from sluice.common.auth import client_interceptors
from sluice.common.model import PRIORITY, PROTO_TO_KIND, PROTO_TO_STATUS
from sluice.v1 import router_pb2, router_pb2_grpc, sender_pb2, sender_pb2_grpc

DEFAULT_ROUTER = "127.0.0.1:50052"
DEFAULT_SENDER = "127.0.0.1:50053"
RPC_TIMEOUT = 5.0
WIDE = 140  # columns for a snapshot that goes to a file or a pipe
SENT_STATUSES = ("sent", "delivered", "bounced", "complained")  # a provider accepted these
HEALTH = {
    router_pb2.PROVIDER_HEALTH_HEALTHY: "healthy",
    router_pb2.PROVIDER_HEALTH_DEGRADED: "degraded",
    router_pb2.PROVIDER_HEALTH_DISABLED: "disabled",
}
_LIFECYCLE = {status: number for number, status in PROTO_TO_STATUS.items()}
_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("provider", "left"),
    ("health", "left"),
    ("success", "right"),
    ("tokens", "right"),
    ("burst left", "right"),
    ("$ per 1,000", "right"),
    ("sent", "right"),
    ("spent $", "right"),
    ("sent/s", "right"),
    ("$ per hour", "right"),
)
HEALTH_STYLE = {"healthy": "green", "degraded": "bold red", "disabled": "dim"}


@dataclass
class ProviderRow:
    """One provider as the router and the sender see it."""

    name: str
    health: str
    enabled: bool
    success_rate: float
    cost_per_thousand: float
    sustained_rate: float
    burst: int
    sent: int = 0
    tokens: float | None = None  # None: the sender did not answer
    burst_available: int | None = None
    unlimited: bool = False

    @property
    def spent(self) -> float:
        """US dollars spent on what this provider accepted (by its configured price)."""
        return self.sent * self.cost_per_thousand / 1000


@dataclass
class StatusSnapshot:
    """One look at the stack, taken at ``taken_at`` (monotonic seconds)."""

    taken_at: float
    by_status_kind: Counter[tuple[str, str]]
    due: int
    oldest_due_age: float
    providers: list[ProviderRow]
    problems: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        """Intents in ``status``, all kinds."""
        return sum(n for (s, _), n in self.by_status_kind.items() if s == status)


async def take_snapshot(
    router: str, sender: str, *, token: str = "", rpc_seconds: float = RPC_TIMEOUT
) -> StatusSnapshot:
    """Asks the router and the sender, with ``token`` (scope read; "" for a stack without
    auth); raises grpc.aio.AioRpcError if the router fails."""
    auth = client_interceptors(token)
    async with grpc.aio.insecure_channel(router, interceptors=auth) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        stats, listed = await asyncio.gather(
            stub.GetQueueStats(router_pb2.GetQueueStatsRequest(), timeout=rpc_seconds),
            stub.ListProviders(router_pb2.ListProvidersRequest(), timeout=rpc_seconds),
        )
    by_status_kind: Counter[tuple[str, str]] = Counter()
    sent: Counter[str] = Counter()
    for row in stats.counts:
        status = PROTO_TO_STATUS.get(int(row.status), "unspecified")
        by_status_kind[status, PROTO_TO_KIND.get(int(row.intent), "unspecified")] += row.count
        if row.provider and status in SENT_STATUSES:
            sent[row.provider] += row.count
    providers = [
        ProviderRow(
            name=p.name,
            health=HEALTH.get(p.health, "unknown"),
            enabled=p.enabled,
            success_rate=p.success_rate,
            cost_per_thousand=p.cost_per_thousand,
            sustained_rate=p.sustained_rate,
            burst=p.burst,
            sent=sent[p.name],
        )
        for p in listed.providers
    ]
    problems = []
    try:
        capacity = await _capacity(sender, token, rpc_seconds)
    except grpc.aio.AioRpcError as exc:
        problems.append(f"sender {sender}: {exc.code().name}: {exc.details()}")
    else:
        for row in providers:
            if (cap := capacity.get(row.name)) is not None:
                row.tokens, row.burst_available = cap.sustained_tokens, cap.burst_available
                row.unlimited = cap.unlimited
    return StatusSnapshot(
        taken_at=time.monotonic(),
        by_status_kind=by_status_kind,
        due=stats.due,
        oldest_due_age=stats.oldest_due_age.ToTimedelta().total_seconds(),
        providers=providers,
        problems=problems,
    )


async def _capacity(
    sender: str, token: str, rpc_seconds: float
) -> dict[str, sender_pb2.ProviderCapacity]:
    async with grpc.aio.insecure_channel(
        sender, interceptors=client_interceptors(token)
    ) as channel:
        answer = await sender_pb2_grpc.SenderServiceStub(channel).GetCapacity(
            sender_pb2.GetCapacityRequest(), timeout=rpc_seconds
        )
    return {c.provider: c for c in answer.providers}


def render(snapshot: StatusSnapshot, previous: StatusSnapshot | None = None) -> Group:
    """The queue table, the providers table and a throughput line."""
    return Group(_queue_table(snapshot), _provider_table(snapshot, previous), *_footer(snapshot))


def _queue_table(snap: StatusSnapshot) -> Table:
    # Kinds in lease priority order, statuses in lifecycle order (the enum's).
    kinds = sorted({k for _, k in snap.by_status_kind}, key=lambda k: PRIORITY.get(k, 99))
    statuses = sorted({s for s, _ in snap.by_status_kind}, key=lambda s: _LIFECYCLE.get(s, 99))
    table = Table(title="queue", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("status")
    for kind in kinds:
        table.add_column(kind, justify="right")
    table.add_column("total", justify="right", style="bold")
    for status in statuses:
        cells = [f"{snap.by_status_kind[status, k]:,}" for k in kinds]
        table.add_row(status, *cells, f"{snap.count(status):,}")
    if not statuses:
        table.add_row("(no intents)", "")
    table.caption = f"due now {snap.due:,}   oldest due waited {_duration(snap.oldest_due_age)}"
    table.caption_justify = "left"
    return table


def _provider_table(snap: StatusSnapshot, previous: StatusSnapshot | None) -> Table:
    table = Table(title="providers", box=box.SIMPLE_HEAD, title_justify="left")
    for name, justify in _COLUMNS:
        table.add_column(name, justify=justify)
    before = {p.name: p.sent for p in previous.providers} if previous else {}
    seconds = snap.taken_at - previous.taken_at if previous else 0.0
    for p in snap.providers:
        health = p.health if p.enabled else "disabled"
        rate = (p.sent - before.get(p.name, p.sent)) / seconds if seconds > 0 else None
        table.add_row(
            escape(p.name),
            f"[{HEALTH_STYLE.get(health, '')}]{health}[/]",
            f"{p.success_rate:.1%}",
            _headroom(p.tokens, p.sustained_rate, p.unlimited),
            "-"
            if p.burst_available is None
            else ("∞" if p.unlimited else f"{p.burst_available}/{p.burst}"),
            f"{p.cost_per_thousand:.2f}",
            f"{p.sent:,}",
            f"{p.spent:.4f}",
            "-" if rate is None else f"{rate:.1f}",
            "-" if rate is None else f"{rate * 3600 * p.cost_per_thousand / 1000:.2f}",
        )
    return table


def _footer(snap: StatusSnapshot) -> list[str]:
    lines = [f"[yellow]{escape(problem)}[/]" for problem in snap.problems]
    sent = sum(p.sent for p in snap.providers)
    spent = sum(p.spent for p in snap.providers)
    average = (
        f"${1000 * spent / sent:.3f} per 1,000 sends on average" if sent else "nothing sent yet"
    )
    lines.append(f"sent {sent:,}, ${spent:.4f} in all, {average}")
    return lines


def _headroom(tokens: float | None, rate: float, unlimited: bool) -> str:
    if unlimited:
        return "∞"
    if tokens is None:
        return "-"
    if rate == 0:
        return "no limit"  # only the burst window applies
    return f"{tokens:.1f} (+{rate:g}/s)"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


async def watch(
    router: str,
    sender: str,
    *,
    interval: float,
    console: Console,
    token: str = "",
    rounds: int | None = None,
) -> int:
    """Redraws the view in place every ``interval`` seconds until interrupted (or for
    ``rounds`` refreshes); a router that stops answering is shown, not fatal."""
    previous: StatusSnapshot | None = None
    with Live(console=console, auto_refresh=False, transient=False) as live:
        done = 0
        while rounds is None or done < rounds:
            try:
                snapshot = await take_snapshot(router, sender, token=token)
            except grpc.aio.AioRpcError as exc:
                live.update(f"[red]router {escape(router)}: {exc.code().name}[/]", refresh=True)
            else:
                live.update(render(snapshot, previous), refresh=True)
                previous = snapshot
            done += 1
            await asyncio.sleep(interval)
    return 0


def run_status(*, router: str, sender: str, once: bool, interval: float) -> int:
    """``sluice status``: one snapshot printed with ``once``, else the live view until
    Ctrl-C, with the token in ``SLUICE_TOKEN`` (as ``sluice demo``). Exit 0, or 1 when the
    router does not answer (for a snapshot)."""
    token = os.environ.get(TOKEN_VARIABLE, "")
    console = Console()
    if not console.is_terminal:
        # Piped or logged: rich would assume 80 columns and cut the providers table.
        console = Console(width=WIDE)
    try:
        if once:
            snapshot = asyncio.run(take_snapshot(router, sender, token=token))
            console.print(render(snapshot), highlight=False)
            return 0
        return asyncio.run(watch(router, sender, interval=interval, console=console, token=token))
    except grpc.aio.AioRpcError as exc:
        Console(stderr=True).print(
            f"sluice status: router {escape(router)} did not answer: {exc.code().name}: "
            f"{escape(exc.details() or '')}",
            highlight=False,
        )
        return 1
    except KeyboardInterrupt:
        return 0
