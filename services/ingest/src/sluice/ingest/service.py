"""IngestService: the thin gRPC layer over admission, validation and the intents repository."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import asyncpg
import grpc

from sluice.common.addresses import RecipientError, check_recipient
from sluice.common.errors import InvalidArgument, NotFound, SluiceError
from sluice.common.metrics import disabled_metrics
from sluice.common.model import KIND_TO_PROTO, PROTO_TO_STATUS, STATUS_TO_PROTO, to_timestamp
from sluice.common.providers import ProviderConfig, takes_smtputf8
from sluice.common.telemetry import current_traceparent
from sluice.common.templates import TemplateCache
from sluice.ingest import cancel, listing, repository, suppression_repository
from sluice.ingest.admission import Admission
from sluice.ingest.coalesce import InsertCoalescer
from sluice.ingest.metrics import IngestMetrics
from sluice.ingest.paging import decode_page_token, encode_page_token, filter_fingerprint
from sluice.ingest.repository import InsertOutcome, IntentRow, NewIntent
from sluice.ingest.settings import IngestSettings
from sluice.ingest.submit import Submitter, db_call
from sluice.ingest.validation import MAX_CAMPAIGN_LENGTH, Policy, check_text, check_time
from sluice.ingest.webhooks import history
from sluice.ingest.webhooks.watch import EventFeed
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, intent_pb2

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_STREAMS = 8  # SubmitIntentStream calls at once; each holds at most one chunk
BATCH_EMPTY = "BATCH_EMPTY"
BATCH_TOO_LARGE = "BATCH_TOO_LARGE"


def smtputf8_kinds(providers: Sequence[ProviderConfig]) -> frozenset[str]:
    """Intent kinds that some enabled provider able to take SMTPUTF8 addresses serves."""
    able = (p for p in providers if p.enabled and takes_smtputf8(p))
    return frozenset(kind for p in able for kind in p.intents)


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
        run=row.run,
        smtputf8=row.smtputf8,
        route_reason=row.route_reason or "",
        route_cost=row.route_cost or 0.0,
        held_for=row.held_for or "",
        reply_to=row.reply_to or "",
        headers=row.headers,
        tags=row.tags,
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
            run=row.run,
            smtputf8=row.smtputf8,
            reply_to=row.reply_to,
            headers=row.headers,
            tags=row.tags,
        )
    )


def _batch_error(count: int, limit: int, field: str) -> InvalidArgument | None:
    if count == 0:
        exc = InvalidArgument("no intents given", [(field, "at least one item")])
        exc.reason = BATCH_EMPTY
        return exc
    if count > limit:
        exc = InvalidArgument(f"{count} intents in one call", [(field, f"at most {limit} items")])
        exc.reason = BATCH_TOO_LARGE
        return exc
    return None


def _check_chunk(chunk: ingest_pb2.SubmitIntentStreamRequest, limit: int) -> None:
    error = _batch_error(len(chunk.intents), limit, "intents")
    if error is not None:
        error.metadata["chunk"] = str(chunk.chunk)
        raise error


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Validates and stores intents; answers questions about them."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: IngestSettings,
        metrics: IngestMetrics | None = None,
        providers: Sequence[ProviderConfig] = (),
    ) -> None:
        self._pool = pool
        self._metrics = metrics if metrics is not None else IngestMetrics(disabled_metrics())
        self._max_batch = settings.ingest_max_batch
        policy = Policy(
            default_deadline=settings.deadline_windows(),
            smtputf8_kinds=smtputf8_kinds(providers),
            check_deliverability=settings.ingest_check_deliverability,
        )
        self._submitter = Submitter(
            pool,
            TemplateCache(pool),
            policy,
            max_pending_per_campaign=settings.ingest_max_pending_per_campaign,
        )
        self.admission = Admission(
            max_calls=settings.ingest_max_in_flight_calls,
            max_items=settings.ingest_max_in_flight_intents,
            retry_after=settings.ingest_retry_after_seconds,
            max_lag=settings.ingest_max_loop_lag_seconds,
        )
        self._lag_watch = asyncio.create_task(self.admission.watch_lag(), name="ingest-lag")
        self._streams = Admission(
            max_calls=MAX_STREAMS, max_items=1, retry_after=settings.ingest_retry_after_seconds
        )
        self._coalescer = InsertCoalescer(
            lambda rows: suppression_repository.insert_intents(pool, rows)
        )
        self._events = EventFeed(
            pool, settings.database_url, max_streams=settings.watch_max_streams
        )

    async def aclose(self) -> None:
        """Stops the background writers and the lag monitor."""
        self._lag_watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._lag_watch
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
        with self.admission.admit(1):
            result = ingest_pb2.SubmitIntentResult()
            now = datetime.now(UTC)
            outcomes: list[InsertOutcome] = []

            async def insert_one(rows: Sequence[NewIntent]) -> list[InsertOutcome]:
                outcomes.append(await self._coalescer.insert(rows[0]))
                return outcomes

            (row,) = await self._submitter.submit(
                [request.intent],
                [result],
                field=lambda _: "intent",
                traceparent=current_traceparent(),
                insert=insert_one,
            )
            if isinstance(row, SluiceError):
                raise row
            if result.created:
                status = "suppressed" if outcomes[0].suppressed else "pending"
                return ingest_pb2.SubmitIntentResponse(
                    intent=_new_to_proto(row, now, status), created=True
                )
            stored = await db_call(repository.get_intent(self._pool, uuid.UUID(result.intent_id)))
            if stored is None:  # only if deleted between the two statements
                raise NotFound(f"intent {result.intent_id} no longer exists")
            return ingest_pb2.SubmitIntentResponse(intent=intent_to_proto(stored), created=False)

    async def SubmitIntents(
        self, request: ingest_pb2.SubmitIntentsRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.SubmitIntentsResponse:
        subs = request.intents
        error = _batch_error(len(subs), self._max_batch, "intents")
        if error is not None:
            raise error
        with self.admission.admit(len(subs)):
            response = ingest_pb2.SubmitIntentsResponse()
            results = [response.results.add() for _ in subs]
            await self._submitter.submit(
                subs, results, field=lambda i: f"intents[{i}]", traceparent=current_traceparent()
            )
            self._observe_results(results)
            return response

    def _observe_results(self, results: Sequence[ingest_pb2.SubmitIntentResult]) -> None:
        created = duplicate = 0
        rejected: list[str] = []
        for r in results:
            if r.outcome == ingest_pb2.SUBMIT_OUTCOME_CREATED:
                created += 1
            elif r.outcome == ingest_pb2.SUBMIT_OUTCOME_DUPLICATE:
                duplicate += 1
            else:
                rejected.append(r.error.reason)
        self._metrics.observe_submissions(
            created=created, duplicate=duplicate, rejected_reasons=rejected
        )

    async def SubmitIntentStream(
        self,
        request_iterator: AsyncIterator[ingest_pb2.SubmitIntentStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ingest_pb2.SubmitIntentStreamResponse]:
        with self._streams.admit(1):
            traceparent = current_traceparent()
            async for chunk in request_iterator:
                _check_chunk(chunk, self._max_batch)
                response = ingest_pb2.SubmitIntentStreamResponse(chunk=chunk.chunk)
                results = [response.results.add() for _ in chunk.intents]
                await self._submitter.submit(
                    chunk.intents, results, field=lambda i: f"intents[{i}]", traceparent=traceparent
                )
                self._observe_results(results)
                for r in results:
                    if r.outcome == ingest_pb2.SUBMIT_OUTCOME_CREATED:
                        response.created += 1
                    elif r.outcome == ingest_pb2.SUBMIT_OUTCOME_DUPLICATE:
                        response.duplicates += 1
                    else:
                        response.rejected += 1
                # Read the next chunk only once this one is answered: with HTTP/2's window,
                # that is the flow control that bounds what a stream holds.
                yield response

    async def GetIntent(
        self, request: ingest_pb2.GetIntentRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.GetIntentResponse:
        intent_id = _parse_uuid(request.id, "id")
        row = await db_call(repository.get_intent(self._pool, intent_id))
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
        check_text("campaign_id", request.campaign_id, MAX_CAMPAIGN_LENGTH)
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        status = PROTO_TO_STATUS.get(int(request.status)) if request.status else None
        if request.status and status is None:
            raise InvalidArgument("unknown status", [("status", "not an IntentStatus value")])
        recipient = _list_recipient(request.recipient)
        created_after = (
            check_time("created_after", request) if request.HasField("created_after") else None
        )
        created_before = (
            check_time("created_before", request) if request.HasField("created_before") else None
        )
        fingerprint = filter_fingerprint(
            request.campaign_id,
            int(request.status),
            recipient,
            request.created_after.ToJsonString() if created_after else "",
            request.created_before.ToJsonString() if created_before else "",
        )
        after = decode_page_token(request.page_token, fingerprint) if request.page_token else None
        rows = await db_call(
            listing.list_intents(
                self._pool,
                limit=size + 1,
                recipient=recipient or None,
                campaign_id=request.campaign_id or None,
                status=status,
                created_after=created_after,
                created_before=created_before,
                after=after,
            )
        )
        page = rows[:size]
        token = ""
        if len(rows) > size:
            last = page[-1]
            token = encode_page_token(last.created_at, last.id, fingerprint)
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
        check_text("campaign_id", request.campaign_id, MAX_CAMPAIGN_LENGTH)
        done = await cancel.cancel_campaign(self._pool, request.campaign_id)
        return ingest_pb2.CancelCampaignResponse(cancelled=done.cancelled, leased=done.leased)


def _list_recipient(raw: str) -> str:
    if not raw:
        return ""
    try:
        return check_recipient(raw[:400]).address
    except RecipientError as exc:
        raise InvalidArgument(f"recipient: {exc}", [("recipient", str(exc)[:200])]) from None


def _parse_uuid(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{field} is not an intent id", [(field, "must be a UUID")]) from None
