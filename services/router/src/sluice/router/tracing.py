"""Span helpers of the dispatcher: the link from a ``sluice.route`` span to its batch's
``sluice.dispatch`` span, and how a route span ends."""

from __future__ import annotations

from opentelemetry import trace

from sluice.router.repository import Completion


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
