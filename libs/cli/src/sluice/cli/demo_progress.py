"""The demo's progress: polling the campaign's queue stats until nothing is open, shown as a
live bar on a terminal and as plain lines elsewhere."""

from __future__ import annotations

import asyncio
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from sluice.cli.demo_report import QueueSnapshot, fold_stats
from sluice.v1 import router_pb2, router_pb2_grpc

POLL_SECONDS = 0.5
PLAIN_EVERY_SECONDS = 2.0


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
