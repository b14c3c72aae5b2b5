"""Coalescing of concurrent single submissions into batched inserts.

Each ``SubmitIntent`` call hands its row to :class:`InsertCoalescer` and awaits the outcome.
A writer task takes whatever rows are waiting (up to ``max_batch``) and inserts them with one
``insert_intents`` call. Nothing waits on a timer: at low load a row is inserted alone at
once; under load, rows that arrive while a write is in flight ride the next one, so batches
grow with the load. One writer is the default because more writers pick rows up one by one
as they arrive: measured with 64 callers, 4 writers averaged 1-2 rows a batch and
~1,230 requests/s, one writer ~1,400 (``python -m bench``, unary row).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

from sluice.ingest.repository import InsertOutcome, NewIntent

InsertFn = Callable[[Sequence[NewIntent]], Awaitable[list[InsertOutcome]]]


class InsertCoalescer:
    """Batches concurrent single-row inserts; see the module docstring."""

    def __init__(self, insert: InsertFn, *, writers: int = 1, max_batch: int = 500) -> None:
        self._insert = insert
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[NewIntent, asyncio.Future[InsertOutcome]]] = (
            asyncio.Queue()
        )
        self._writers = [
            asyncio.create_task(self._run(), name=f"ingest-writer-{i}") for i in range(writers)
        ]

    async def insert(self, row: NewIntent) -> InsertOutcome:
        """Inserts one row (possibly with others) and returns its outcome."""
        future: asyncio.Future[InsertOutcome] = asyncio.get_running_loop().create_future()
        await self._queue.put((row, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # One turn of the event loop lets calls that are already being handled (parsed,
            # validated) put their rows in first; costs no timer and no latency at low load.
            await asyncio.sleep(0)
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            live = [(row, fut) for row, fut in batch if not fut.cancelled()]
            if not live:
                continue
            try:
                outcomes = await self._insert([row for row, _ in live])
            except asyncio.CancelledError:
                # Closing mid-insert: the callers of this batch must not wait forever.
                for _, fut in live:
                    fut.cancel()
                raise
            except Exception as exc:  # noqa: BLE001  (handed to every waiting caller)
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), outcome in zip(live, outcomes, strict=True):
                if not fut.done():
                    fut.set_result(outcome)

    async def aclose(self) -> None:
        """Stops the writers; callers still waiting get CancelledError."""
        for task in self._writers:
            task.cancel()
        for task in self._writers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            fut.cancel()
