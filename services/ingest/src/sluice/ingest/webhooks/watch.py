"""WatchIntentEvents: events streamed to clients as they are stored.

One LISTEN connection per ingest process (opened on the first watcher) wakes every stream
when a batch commits (``NOTIFY sluice_delivery_events``); each stream then reads the new
rows after its cursor. Streams also poll every ``poll_seconds``, so a lost notification or
LISTEN connection delays events but never loses them. Cursors are event ids, which commit in
id order (see 0006), so "after cursor" is exact: a client that resumes with the last cursor
it saw gets everything after it, once.

Bounded: at most ``max_streams`` streams per process (more get RESOURCE_EXHAUSTED), and
each read is at most ``PAGE`` rows and a ``SPAN`` of ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg

from sluice.common.errors import InvalidArgument, ResourceExhausted
from sluice.common.model import PROTO_TO_KIND
from sluice.ingest.webhooks import history
from sluice.ingest.webhooks.repository import NOTIFY_CHANNEL
from sluice.v1 import ingest_pb2

log = logging.getLogger("sluice.ingest.watch")

PAGE = 500
SPAN = 20_000


class EventFeed:
    """See the module docstring."""

    def __init__(
        self, pool: asyncpg.Pool, dsn: str, *, max_streams: int, poll_seconds: float = 1.0
    ) -> None:
        self._pool = pool
        self._dsn = dsn
        self._max_streams = max_streams
        self._poll = poll_seconds
        self._streams = 0
        self._changed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    def _notified(self, *_: object) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _listen(self) -> None:
        # Reconnects forever; while disconnected the streams fall back to polling.
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn)
                closed = asyncio.Event()
                conn.add_termination_listener(lambda _c, ev=closed: ev.set())
                await conn.add_listener(NOTIFY_CHANNEL, self._notified)
                await closed.wait()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("event LISTEN connection failed (polling meanwhile): %s", exc)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=1)
            await asyncio.sleep(self._poll)

    async def aclose(self) -> None:
        """Stops the LISTEN connection."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    async def watch(
        self, request: ingest_pb2.WatchIntentEventsRequest
    ) -> AsyncIterator[ingest_pb2.WatchIntentEventsResponse]:
        """The stream for one WatchIntentEvents call."""
        kind = None
        if request.intent:
            kind = PROTO_TO_KIND.get(int(request.intent))
            if kind is None:
                raise InvalidArgument("unknown intent", [("intent", "not an Intent value")])
        types = []
        for i, value in enumerate(request.types):
            name = history.PROTO_TO_TYPE.get(value)
            if name is None:
                raise InvalidArgument(
                    "unknown event type", [(f"types[{i}]", "not a DeliveryEventType value")]
                )
            types.append(name)
        cursor = await self._start_cursor(request.after_cursor)
        if self._streams >= self._max_streams:
            raise ResourceExhausted("too many event watchers on this server", retry_after=5.0)
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="event-listen")
        self._streams += 1
        try:
            while True:
                changed = self._changed  # taken before reading: a commit after it wakes us
                newest = await history.last_id(self._pool)
                if newest > cursor:
                    upto = min(newest, cursor + SPAN)
                    rows = await history.page(
                        self._pool,
                        after=cursor,
                        upto=upto,
                        campaign_id=request.campaign_id or None,
                        kind=kind,
                        types=types,
                        limit=PAGE,
                    )
                    for row in rows:
                        yield ingest_pb2.WatchIntentEventsResponse(event=history.to_proto(row))
                    cursor = int(rows[-1]["id"]) if len(rows) == PAGE else upto
                    continue  # read on until caught up
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self._poll)
        finally:
            self._streams -= 1

    async def _start_cursor(self, text: str) -> int:
        if not text:
            return await history.last_id(self._pool)
        if not text.isdigit():
            raise InvalidArgument(
                "after_cursor is not valid", [("after_cursor", "use a cursor from an event")]
            )
        return int(text)
