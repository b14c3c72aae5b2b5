"""Spans of the dispatcher, and the SendBatch request built with them.

With tracing off every method is a no-op (no span objects, empty traceparents), so the hot
path pays nothing for it. With tracing on, a round is one ``sluice.dispatch`` span and each
intent one ``sluice.route`` span, a child of the call that submitted it (its stored
traceparent) linked to the round's span; the route span's context travels to the sender in
the message's traceparent.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping, Sequence

from opentelemetry import trace

from sluice.common.telemetry import Telemetry, context_from_traceparent, current_traceparent
from sluice.common.templates import TemplateRow
from sluice.router.repository import Completion, LeasedIntent
from sluice.router.routing import PlannedBatch
from sluice.v1 import sender_pb2


def _batch_link() -> list[trace.Link]:
    current = trace.get_current_span().get_span_context()
    return [trace.Link(current)] if current.is_valid else []


def _end_route_span(span: trace.Span, completion: Completion) -> None:
    span.set_attribute("sluice.status", completion.status)
    if completion.provider_message_id:
        span.set_attribute("sluice.provider_message_id", completion.provider_message_id)
    if completion.status in ("failed", "expired"):
        span.set_status(trace.Status(trace.StatusCode.ERROR, completion.last_error or ""))
    span.end()


def template_content(row: TemplateRow) -> sender_pb2.TemplateContent:
    """The template as SendBatch carries it."""
    return sender_pb2.TemplateContent(
        id=row.id,
        version=row.version,
        subject=row.subject,
        html_body=row.html_body,
        text_body=row.text_body,
        variables=list(row.variables),
        from_address=row.from_address,
    )


def _message(intent: LeasedIntent, traceparent: str) -> sender_pb2.OutboundMessage:
    intent_id = str(intent.id)
    return sender_pb2.OutboundMessage(
        intent_id=intent_id,
        recipient=intent.recipient,
        variables=intent.variables,
        # The intent id, not the client's key: unique per intent and stable across retries
        # (an unknown outcome's retry included), which is what a provider's idempotency
        # key needs.
        idempotency_key=intent_id,
        traceparent=traceparent,
        reply_to=intent.reply_to or "",
        headers=intent.headers,
        tags=intent.tags,
    )


class RoundTracing:
    """The dispatcher's spans (see the module docstring)."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        self.enabled = telemetry.enabled

    @contextlib.contextmanager
    def dispatch(self, lease_id: uuid.UUID, leased: int) -> Iterator[None]:
        """The round's ``sluice.dispatch`` span (nothing when tracing is off)."""
        if not self.enabled:
            yield
            return
        with self._telemetry.tracer.start_as_current_span(
            "sluice.dispatch",
            attributes={"sluice.lease_id": str(lease_id), "sluice.leased": leased},
        ):
            yield

    def request(
        self, batch: PlannedBatch, template: TemplateRow
    ) -> tuple[list[trace.Span], sender_pb2.SendBatchRequest]:
        """The SendBatch request of ``batch``, and one route span per intent, in order."""
        spans: list[trace.Span] = []
        if self.enabled:
            messages = []
            for intent in batch.intents:
                span, traceparent = self._route_span(intent, batch.provider)
                spans.append(span)
                messages.append(_message(intent, traceparent))
        else:
            messages = [_message(intent, "") for intent in batch.intents]
        request = sender_pb2.SendBatchRequest(
            provider=batch.provider, template=template_content(template), messages=messages
        )
        return spans, request

    def end(self, spans: Sequence[trace.Span], completions: Sequence[Completion]) -> None:
        """Ends route spans with their intents' outcomes (both in batch order)."""
        if not spans:
            return
        for span, c in zip(spans, completions, strict=True):
            _end_route_span(span, c)

    def abandon(self, spans: Sequence[trace.Span]) -> None:
        """Ends route spans of a call cut short."""
        for span in spans:
            span.end()

    def decided(
        self, completions: Sequence[Completion], leased: Mapping[uuid.UUID, LeasedIntent]
    ) -> None:
        """A ``sluice.route`` span for each intent decided without sending (expired, no
        provider), so its trace shows why it stopped."""
        if not self.enabled:
            return
        for c in completions:
            intent = leased[c.intent_id]
            span = self._telemetry.tracer.start_span(
                "sluice.route",
                context=context_from_traceparent(intent.traceparent),
                attributes={"sluice.intent_id": str(intent.id), "sluice.intent": intent.kind},
                links=_batch_link(),
            )
            _end_route_span(span, c)

    def _route_span(self, intent: LeasedIntent, provider: str) -> tuple[trace.Span, str]:
        span = self._telemetry.tracer.start_span(
            "sluice.route",
            context=context_from_traceparent(intent.traceparent),
            attributes={
                "sluice.intent_id": str(intent.id),
                "sluice.intent": intent.kind,
                "sluice.provider": provider,
                "sluice.attempt": intent.attempts + 1,
            },
            links=_batch_link(),
        )
        with trace.use_span(span, end_on_exit=False):
            traceparent = current_traceparent()
        return span, traceparent
