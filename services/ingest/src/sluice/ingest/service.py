"""IngestService: the thin gRPC layer over validation and the intents repository."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg
import grpc

from sluice.common.errors import AlreadyExists, InvalidArgument, NotFound, SluiceError
from sluice.common.metrics import disabled_metrics
from sluice.common.model import (
    KIND_TO_PROTO,
    PROTO_TO_STATUS,
    STATUS_TO_PROTO,
    from_timestamp,
    to_timestamp,
)
from sluice.common.telemetry import current_traceparent
from sluice.common.templates import TemplateCache
from sluice.ingest import cancel, listing, repository, suppression_repository
from sluice.ingest.coalesce import InsertCoalescer
from sluice.ingest.metrics import IngestMetrics
from sluice.ingest.repository import InsertOutcome, IntentRow, NewIntent
from sluice.ingest.settings import IngestSettings
from sluice.ingest.validation import normalize_recipient, validate_submission
from sluice.ingest.webhooks import history
from sluice.ingest.webhooks.watch import EventFeed
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, intent_pb2

T = TypeVar("T")

MAX_BATCH = 1000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def intent_to_proto(row: IntentRow) -> intent_pb2.EmailIntent:
    """The wire form of a stored intent."""
    msg = intent_pb2.EmailIntent(
        id=str(row.id),
        idempotency_key=row.idempotency_key,
        campaign_id=row.campaign_id,
        recipient=row.recipient,
        intent=KIND_TO_PROTO[row.kind],
        template_id=row.template_id,
        variables=row.variables,
        status=STATUS_TO_PROTO[row.status],
        provider=row.provider or "",
        provider_message_id=row.provider_message_id or "",
        attempts=row.attempts,
        last_error=row.last_error or "",
        route_reason=row.route_reason or "",
        route_cost=row.route_cost or 0.0,
        held_for=row.held_for or "",
    )
    for name, value in (
        ("send_at", row.send_at),
        ("deadline", row.deadline),
        ("create_time", row.created_at),
        ("update_time", row.updated_at),
    ):
        ts = to_timestamp(value)
        if ts is not None:
            getattr(msg, name).CopyFrom(ts)
    return msg


def _new_to_proto(
    row: NewIntent, created_at: datetime, status: str = "pending"
) -> intent_pb2.EmailIntent:
    return intent_to_proto(
        IntentRow(
            id=row.id,
            idempotency_key=row.idempotency_key,
            campaign_id=row.campaign_id,
            recipient=row.recipient,
            kind=row.kind,
            priority=row.priority,
            template_id=row.template_id,
            variables=row.variables,
            send_at=row.send_at,
            deadline=row.deadline,
            due_at=row.send_at,
            status=status,
            provider=None,
            provider_message_id=None,
            attempts=0,
            last_error=None,
            traceparent=row.traceparent,
            created_at=created_at,
            updated_at=created_at,
        )
    )


def _conflict(key: str, intent_id: uuid.UUID | None) -> AlreadyExists:
    return AlreadyExists(
        f"idempotency key {key!r} already names an intent with a different payload",
        metadata={"intent_id": str(intent_id or ""), "idempotency_key": key},
    )


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Validates and stores intents; answers questions about them."""

    def __init__(
        self, pool: asyncpg.Pool, settings: IngestSettings, metrics: IngestMetrics | None = None
    ) -> None:
        self._pool = pool
        self._metrics = metrics if metrics is not None else IngestMetrics(disabled_metrics())
        self._templates = TemplateCache(pool)
        self._default_deadline = settings.deadline_windows()
        self._coalescer = InsertCoalescer(
            lambda rows: suppression_repository.insert_intents(pool, rows)
        )
        self._events = EventFeed(
            pool, settings.database_url, max_streams=settings.watch_max_streams
        )

    async def aclose(self) -> None:
        """Stops the background writers."""
        await self._coalescer.aclose()
        await self._events.aclose()

    async def SubmitIntent(
        self, request: ingest_pb2.SubmitIntentRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.SubmitIntentResponse:
        try:
            response = await self._submit_one(request)
        except SluiceError as exc:
            self._metrics.observe_submissions(rejected_reasons=(exc.reason,))
            raise
        if response.created:
            self._metrics.observe_submissions(created=1)
        else:
            self._metrics.observe_submissions(duplicate=1)
        return response

    async def _submit_one(
        self, request: ingest_pb2.SubmitIntentRequest
    ) -> ingest_pb2.SubmitIntentResponse:
        sub = request.intent
        templates = await self._templates.get_many([sub.template_id])
        now = datetime.now(UTC)
        row = validate_submission(
            sub,
            templates,
            now=now,
            default_deadline=self._default_deadline,
            traceparent=current_traceparent(),
        )
        outcome: InsertOutcome = await self._coalescer.insert(row)
        if outcome.conflict:
            raise _conflict(row.idempotency_key, outcome.intent_id)
        if outcome.created:
            status = "suppressed" if outcome.suppressed else "pending"
            return ingest_pb2.SubmitIntentResponse(
                intent=_new_to_proto(row, now, status), created=True
            )
        assert outcome.intent_id is not None
        stored = await repository.get_intent(self._pool, outcome.intent_id)
        if stored is None:  # only if deleted between the two statements
            raise NotFound(f"intent {outcome.intent_id} no longer exists")
        return ingest_pb2.SubmitIntentResponse(intent=intent_to_proto(stored), created=False)

    async def SubmitIntents(
        self, request: ingest_pb2.SubmitIntentsRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.SubmitIntentsResponse:
        subs = request.intents
        if not subs:
            raise InvalidArgument("no intents given", [("intents", "at least one item")])
        if len(subs) > MAX_BATCH:
            raise InvalidArgument(
                f"{len(subs)} intents in one call", [("intents", f"at most {MAX_BATCH} items")]
            )
        templates = await self._templates.get_many(s.template_id for s in subs)
        now = datetime.now(UTC)
        traceparent = current_traceparent()
        results = [ingest_pb2.SubmitIntentResult() for _ in subs]
        rows: list[NewIntent] = []
        positions: list[int] = []
        for i, sub in enumerate(subs):
            try:
                rows.append(
                    validate_submission(
                        sub,
                        templates,
                        now=now,
                        default_deadline=self._default_deadline,
                        traceparent=traceparent,
                        field_prefix=f"intents[{i}]",
                    )
                )
                positions.append(i)
            except InvalidArgument as exc:
                _set_error(results[i], exc)
        if rows:
            outcomes = await suppression_repository.insert_intents(self._pool, rows)
            for i, row, outcome in zip(positions, rows, outcomes, strict=True):
                if outcome.conflict:
                    _set_error(results[i], _conflict(row.idempotency_key, outcome.intent_id))
                else:
                    results[i].intent_id = str(outcome.intent_id)
                    results[i].created = outcome.created
        self._observe_results(results)
        return ingest_pb2.SubmitIntentsResponse(results=results)

    def _observe_results(self, results: Sequence[ingest_pb2.SubmitIntentResult]) -> None:
        created = duplicate = 0
        rejected: list[str] = []
        for r in results:
            if r.error.code:
                rejected.append(_CODE_NAMES.get(r.error.code, "UNKNOWN"))
            elif r.created:
                created += 1
            else:
                duplicate += 1
        self._metrics.observe_submissions(
            created=created, duplicate=duplicate, rejected_reasons=rejected
        )

    async def GetIntent(
        self, request: ingest_pb2.GetIntentRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.GetIntentResponse:
        intent_id = _parse_uuid(request.id, "id")
        row = await repository.get_intent(self._pool, intent_id)
        if row is None:
            raise NotFound(f"intent {intent_id} does not exist")
        events = await history.intent_events(self._pool, intent_id)
        return ingest_pb2.GetIntentResponse(intent=intent_to_proto(row), events=events)

    async def WatchIntentEvents(
        self, request: ingest_pb2.WatchIntentEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ingest_pb2.WatchIntentEventsResponse]:
        async for response in self._events.watch(request):
            yield response

    async def ListIntents(
        self, request: ingest_pb2.ListIntentsRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.ListIntentsResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size is negative", [("page_size", "must not be negative")])
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        status = PROTO_TO_STATUS.get(int(request.status)) if request.status else None
        if request.status and status is None:
            raise InvalidArgument("unknown status", [("status", "not an IntentStatus value")])
        recipient = _list_recipient(request.recipient)
        created_after = (
            from_timestamp(request.created_after) if request.HasField("created_after") else None
        )
        created_before = (
            from_timestamp(request.created_before) if request.HasField("created_before") else None
        )
        fingerprint = _filter_fingerprint(
            request.campaign_id,
            int(request.status),
            recipient,
            request.created_after.ToJsonString() if created_after else "",
            request.created_before.ToJsonString() if created_before else "",
        )
        after = _decode_page_token(request.page_token, fingerprint) if request.page_token else None
        rows = await listing.list_intents(
            self._pool,
            limit=size + 1,
            recipient=recipient or None,
            campaign_id=request.campaign_id or None,
            status=status,
            created_after=created_after,
            created_before=created_before,
            after=after,
        )
        page = rows[:size]
        token = ""
        if len(rows) > size:
            last = page[-1]
            token = _encode_page_token(last.created_at, last.id, fingerprint)
        return ingest_pb2.ListIntentsResponse(
            intents=[intent_to_proto(r) for r in page], next_page_token=token
        )

    async def CancelIntent(
        self, request: ingest_pb2.CancelIntentRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.CancelIntentResponse:
        row, cancelled = await cancel.cancel_intent(self._pool, _parse_uuid(request.id, "id"))
        return ingest_pb2.CancelIntentResponse(intent=intent_to_proto(row), cancelled=cancelled)

    async def CancelCampaign(
        self, request: ingest_pb2.CancelCampaignRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.CancelCampaignResponse:
        if not request.campaign_id:
            raise InvalidArgument("campaign_id is required", [("campaign_id", "required")])
        done = await cancel.cancel_campaign(self._pool, request.campaign_id)
        return ingest_pb2.CancelCampaignResponse(cancelled=done.cancelled, leased=done.leased)


def _list_recipient(raw: str) -> str:
    if not raw:
        return ""
    try:
        return normalize_recipient(raw)
    except ValueError as exc:
        raise InvalidArgument(f"recipient: {exc}", [("recipient", str(exc))]) from None


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def _set_error(result: ingest_pb2.SubmitIntentResult, exc: SluiceError) -> None:
    result.error.code = exc.code.value[0]
    result.error.message = exc.message
    if isinstance(exc, InvalidArgument):
        for field, description in exc.field_violations:
            result.error.field_violations.add(field=field, description=description)


def _parse_uuid(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{field} is not an intent id", [(field, "must be a UUID")]) from None


def _filter_fingerprint(campaign_id: str, status: int, *more: str) -> str:
    # AIP-158: a page token is only valid with the filters it was issued for. Filters added
    # later count only when set, so tokens issued before them stay valid.
    extra = "".join(f"\x00{m}" for m in more) if any(more) else ""
    return hashlib.sha256(f"{campaign_id}\x00{status}{extra}".encode()).hexdigest()[:16]


def _encode_page_token(created_at: datetime, intent_id: uuid.UUID, fingerprint: str) -> str:
    raw = json.dumps({"t": created_at.isoformat(), "i": str(intent_id), "f": fingerprint})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_page_token(token: str, fingerprint: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        created_at = datetime.fromisoformat(raw["t"])
        intent_id = uuid.UUID(raw["i"])
        issued_for = raw["f"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidArgument(
            "page_token is not valid", [("page_token", "not a token this server issued")]
        ) from None
    if issued_for != fingerprint:
        raise InvalidArgument(
            "page_token was issued for other filters",
            [("page_token", "use it with the same campaign_id and status it came with")],
        )
    return created_at, intent_id
