"""InsertCoalescer: concurrent single inserts become batches; outcomes and errors reach
every caller. Pure asyncio: the insert function here records its batches."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from sluice.ingest.coalesce import InsertCoalescer
from sluice.ingest.repository import InsertOutcome, NewIntent


def row(key: str) -> NewIntent:
    now = datetime.now(UTC)
    return NewIntent(
        id=uuid.uuid4(),
        idempotency_key=key,
        payload_hash=b"h",
        campaign_id="",
        recipient="a@example.com",
        kind="marketing",
        priority=2,
        template_id="t",
        variables={},
        send_at=now,
        deadline=now,
        traceparent=None,
    )


async def test_concurrent_inserts_share_batches_and_get_their_own_outcome() -> None:
    batches: list[list[str]] = []

    async def insert(rows: Sequence[NewIntent]) -> list[InsertOutcome]:
        batches.append([r.idempotency_key for r in rows])
        await asyncio.sleep(0.01)  # a database round trip
        return [InsertOutcome(intent_id=r.id, created=True, conflict=False) for r in rows]

    coalescer = InsertCoalescer(insert)
    rows = [row(f"k{i}") for i in range(200)]
    outcomes = await asyncio.gather(*(coalescer.insert(r) for r in rows))
    await coalescer.aclose()
    assert [o.intent_id for o in outcomes] == [r.id for r in rows]
    assert sorted(k for b in batches for k in b) == sorted(r.idempotency_key for r in rows)
    # 200 callers at once: a handful of inserts, not 200.
    assert len(batches) <= 5, [len(b) for b in batches]


async def test_an_insert_error_reaches_every_caller_of_that_batch() -> None:
    async def insert(rows: Sequence[NewIntent]) -> list[InsertOutcome]:
        raise ConnectionResetError("database went away")

    coalescer = InsertCoalescer(insert)
    results = await asyncio.gather(
        *(coalescer.insert(row(f"k{i}")) for i in range(10)), return_exceptions=True
    )
    await coalescer.aclose()
    assert all(isinstance(r, ConnectionResetError) for r in results)


async def test_close_cancels_waiting_callers() -> None:
    started = asyncio.Event()

    async def insert(rows: Sequence[NewIntent]) -> list[InsertOutcome]:
        started.set()
        await asyncio.sleep(10)
        raise AssertionError("unreachable")

    coalescer = InsertCoalescer(insert)
    waiting = asyncio.ensure_future(coalescer.insert(row("k")))
    await started.wait()
    await coalescer.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiting
