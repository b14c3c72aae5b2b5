"""The submit paths shared by SubmitIntent, SubmitIntents and SubmitIntentStream.

One batch of submissions costs a constant number of statements whatever its size: one
template lookup (usually none: templates are cached), one INSERT and at most one SELECT
(see :func:`sluice.ingest.repository.insert_intents`), plus one count per batch when a
per-campaign pending limit is set. One bad item never fails the others: it gets its own
rejected result, and the rest are stored.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg

from sluice.common.errors import (
    AlreadyExists,
    InvalidArgument,
    ResourceExhausted,
    SluiceError,
    Unavailable,
)
from sluice.common.templates import TemplateCache
from sluice.ingest import suppression_repository
from sluice.ingest.repository import InsertOutcome, NewIntent, TemplateRow
from sluice.ingest.validation import MAX_TEMPLATE_ID_LENGTH, Policy, validate_submission
from sluice.ingest.violations import UNSAFE_LINE, quote
from sluice.v1 import ingest_pb2, intent_pb2

T = TypeVar("T")

IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
PENDING_LIMIT = "CAMPAIGN_PENDING_LIMIT"
PENDING_CACHE_SECONDS = 1.0
VALIDATE_SLICE = 250  # submissions validated between two yields to the event loop (~6 ms)

COUNT_PENDING_SQL = """
SELECT campaign_id, count(*) AS pending FROM intents
WHERE campaign_id = ANY($1::text[]) AND status = 'pending'
GROUP BY campaign_id
"""

_UNSET = SluiceError("not yet decided")

CREATED = ingest_pb2.SUBMIT_OUTCOME_CREATED
DUPLICATE = ingest_pb2.SUBMIT_OUTCOME_DUPLICATE
REJECTED = ingest_pb2.SUBMIT_OUTCOME_REJECTED


async def db_call(awaitable: Awaitable[T]) -> T:
    """Awaits a repository call, turning a lost database into UNAVAILABLE (safe to retry)."""
    try:
        return await awaitable
    except (
        OSError,
        asyncpg.exceptions.InterfaceError,
        asyncpg.exceptions.CannotConnectNowError,
        asyncpg.exceptions.ConnectionDoesNotExistError,
    ) as exc:
        raise Unavailable(f"database unavailable: {type(exc).__name__}") from exc


def key_reused(key: str, intent_id: uuid.UUID | None) -> AlreadyExists:
    """The error for an idempotency key that names an intent with other content."""
    exc = AlreadyExists(
        f"idempotency key {quote(key)} already names an intent with a different payload",
        metadata={"intent_id": str(intent_id or ""), "idempotency_key": key},
    )
    exc.reason = IDEMPOTENCY_KEY_REUSED
    return exc


def set_error(result: ingest_pb2.SubmitIntentResult, exc: SluiceError) -> None:
    """Marks one batch item rejected with ``exc``'s code, reason, details and metadata."""
    result.outcome = REJECTED
    result.error.code = exc.code.value[0]
    result.error.message = exc.message
    result.error.reason = exc.reason
    result.error.metadata.update(exc.metadata)
    if isinstance(exc, InvalidArgument):
        for field, description in exc.field_violations:
            result.error.field_violations.add(field=field, description=description)


def _lookup_ids(subs: Sequence[intent_pb2.IntentSubmission]) -> set[str]:
    # Only ids that could name a template reach the database: PostgreSQL refuses NUL in
    # text, and validation reports the bad ones anyway.
    return {
        s.template_id
        for s in subs
        if s.template_id
        and len(s.template_id) <= MAX_TEMPLATE_ID_LENGTH
        and not UNSAFE_LINE.search(s.template_id)
    }


class Submitter:
    """Validates and stores submissions; see the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        templates: TemplateCache,
        policy: Policy,
        *,
        max_pending_per_campaign: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._templates = templates
        self.policy = policy
        self._max_pending = max_pending_per_campaign
        self._clock = clock
        # campaign -> (counted at, pending then plus what this process created since)
        self._pending: dict[str, tuple[float, int]] = {}

    async def templates(
        self, subs: Sequence[intent_pb2.IntentSubmission]
    ) -> dict[str, TemplateRow]:
        """The templates the submissions name that exist."""
        return await db_call(self._templates.get_many(_lookup_ids(subs)))

    def _validate_all(
        self,
        subs: Sequence[intent_pb2.IntentSubmission],
        start: int,
        templates: dict[str, TemplateRow],
        field: Callable[[int], str],
        results: list[ingest_pb2.SubmitIntentResult],
        errors: list[NewIntent | SluiceError],
        traceparent: str | None,
    ) -> tuple[list[NewIntent], list[int]]:
        now = datetime.now(UTC)
        rows: list[NewIntent] = []
        positions: list[int] = []
        for i in range(start, min(start + VALIDATE_SLICE, len(subs))):
            sub = subs[i]
            try:
                rows.append(
                    validate_submission(
                        sub,
                        templates,
                        now=now,
                        policy=self.policy,
                        traceparent=traceparent,
                        field_prefix=field(i),
                    )
                )
                positions.append(i)
            except InvalidArgument as exc:
                set_error(results[i], exc)
                errors[i] = exc
        return rows, positions

    async def submit(
        self,
        subs: Sequence[intent_pb2.IntentSubmission],
        results: list[ingest_pb2.SubmitIntentResult],
        *,
        field: Callable[[int], str],
        traceparent: str | None,
        insert: Callable[[Sequence[NewIntent]], Awaitable[list[InsertOutcome]]] | None = None,
    ) -> list[NewIntent | SluiceError]:
        """Fills ``results`` (one per submission) and returns, for each, the row it was
        stored as (created or duplicate) or the error that rejected it."""
        templates = await self.templates(subs)
        # Every position is overwritten below: a row, or the error that rejected it.
        rows_by_pos: list[NewIntent | SluiceError] = [_UNSET] * len(subs)
        rows: list[NewIntent] = []
        positions: list[int] = []
        for start in range(0, len(subs), VALIDATE_SLICE):
            args = (subs, start, templates, field, results, rows_by_pos, traceparent)
            if self.policy.check_deliverability:
                # DNS lookups block; keep them off the event loop.
                part = await asyncio.to_thread(self._validate_all, *args)
            else:
                part = self._validate_all(*args)
                if len(subs) > VALIDATE_SLICE:
                    # Let other calls run between slices: validating 10,000 intents in one
                    # go would hold the loop for a quarter of a second.
                    await asyncio.sleep(0)
            rows.extend(part[0])
            positions.extend(part[1])
        if self._max_pending and rows:
            rows, positions = await self._within_pending_limit(
                rows, positions, results, rows_by_pos
            )
        if not rows:
            return rows_by_pos
        store = insert or (lambda batch: suppression_repository.insert_intents(self._pool, batch))
        outcomes = await db_call(store(rows))
        for i, row, outcome in zip(positions, rows, outcomes, strict=True):
            result = results[i]
            if outcome.conflict:
                rows_by_pos[i] = exc = key_reused(row.idempotency_key, outcome.intent_id)
                set_error(result, exc)
                continue
            result.intent_id = str(outcome.intent_id)
            result.created = outcome.created
            result.outcome = CREATED if outcome.created else DUPLICATE
            rows_by_pos[i] = row
            if outcome.created and self._max_pending:
                self._count_created(row.campaign_id)
        return rows_by_pos

    async def _within_pending_limit(
        self,
        rows: list[NewIntent],
        positions: list[int],
        results: list[ingest_pb2.SubmitIntentResult],
        errors: list[NewIntent | SluiceError],
    ) -> tuple[list[NewIntent], list[int]]:
        """Refuses the rows of campaigns at their pending limit (counts cached a second:
        counting a big campaign's rows costs far more than inserting a batch)."""
        now = self._clock()
        stale = sorted(
            {
                r.campaign_id
                for r in rows
                if r.campaign_id
                and now - self._pending.get(r.campaign_id, (-1e9, 0))[0] >= PENDING_CACHE_SECONDS
            }
        )
        if len(self._pending) > 10_000:  # bounded memory: forget counts nobody reads
            self._pending = {
                c: e for c, e in self._pending.items() if now - e[0] < PENDING_CACHE_SECONDS
            }
        if stale:
            counted = dict.fromkeys(stale, 0)
            for rec in await db_call(self._pool.fetch(COUNT_PENDING_SQL, stale)):
                counted[rec["campaign_id"]] = int(rec["pending"])
            for campaign, pending in counted.items():
                self._pending[campaign] = (now, pending)
        kept_rows: list[NewIntent] = []
        kept_positions: list[int] = []
        budget = {c: self._max_pending - p for c, (_, p) in self._pending.items()}
        for row, i in zip(rows, positions, strict=True):
            if row.campaign_id and budget.get(row.campaign_id, 1) <= 0:
                exc = ResourceExhausted(
                    f"campaign {quote(row.campaign_id)} has {self._max_pending} pending intents,"
                    " its limit; retry when some are sent",
                    retry_after=PENDING_CACHE_SECONDS * 5,
                    metadata={"limit": str(self._max_pending)},
                )
                exc.reason = PENDING_LIMIT
                set_error(results[i], exc)
                errors[i] = exc
                continue
            if row.campaign_id:
                budget[row.campaign_id] = budget.get(row.campaign_id, 1) - 1
            kept_rows.append(row)
            kept_positions.append(i)
        return kept_rows, kept_positions

    def _count_created(self, campaign: str) -> None:
        if campaign in self._pending:
            read_at, pending = self._pending[campaign]
            self._pending[campaign] = (read_at, pending + 1)
