"""Coalesces concurrent webhook requests into one :func:`repository.record` transaction.

SES and Resend post one event per request. Writing each in its own transaction costs about
ten statements per event; instead every request hands its events to the writer and waits,
and the writer takes everything that is waiting (up to ``max_events``) into one batch. At
low load a request is written alone at once; under load batches grow with the load. A
request is answered only after its batch has committed, so a 200 always means stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from sluice.ingest.webhooks.events import DeliveryEvent
from sluice.ingest.webhooks.repository import RecordResult

RecordFn = Callable[[Sequence[DeliveryEvent]], Awaitable[RecordResult]]


class EventWriter:
    """See the module docstring."""

    def __init__(self, record: RecordFn, *, max_events: int = 2000) -> None:
        self._record = record
        self._max_events = max_events
        self._queue: asyncio.Queue[tuple[Sequence[DeliveryEvent], asyncio.Future[RecordResult]]] = (
            asyncio.Queue()
        )

    async def write(self, events: Sequence[DeliveryEvent]) -> RecordResult:
        """Stores ``events`` (perhaps with other requests' events); returns the batch's
        result."""
        future: asyncio.Future[RecordResult] = asyncio.get_running_loop().create_future()
        await self._queue.put((events, future))
        return await future

    async def run(self) -> None:
        """The writer loop; runs until cancelled (a supervised task of the service). Requests
        still waiting when it is cancelled get CancelledError."""
        try:
            await self._loop()
        finally:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                fut.cancel()

    async def _loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(0)  # let requests already being parsed join this batch
            size = len(batch[0][0])
            while size < self._max_events and not self._queue.empty():
                item = self._queue.get_nowait()
                batch.append(item)
                size += len(item[0])
            live = [(events, fut) for events, fut in batch if not fut.cancelled()]
            if not live:
                continue
            try:
                result = await self._record([e for events, _ in live for e in events])
            except asyncio.CancelledError:
                for _, fut in live:
                    fut.cancel()
                raise
            except Exception:  # noqa: BLE001  (retried per request just below)
                # One request's bad data must not fail the others it was batched with: each
                # is written alone, and only the one that fails again gets the error.
                await self._one_by_one(live)
                continue
            for _, fut in live:
                if not fut.done():
                    fut.set_result(result)

    async def _one_by_one(
        self, live: list[tuple[Sequence[DeliveryEvent], asyncio.Future[RecordResult]]]
    ) -> None:
        for events, fut in live:
            try:
                result = await self._record(events)
            except asyncio.CancelledError:
                for _, waiting in live:
                    waiting.cancel()
                raise
            except Exception as exc:  # noqa: BLE001  (handed to the waiting request)
                if not fut.done():
                    fut.set_exception(exc)
                continue
            if not fut.done():
                fut.set_result(result)
