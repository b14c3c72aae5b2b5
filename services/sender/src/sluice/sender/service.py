"""SenderService: reserve tokens, render, send through the provider, answer per message.

Every message of a ``SendBatch`` gets exactly one result, in request order. What the rate
limits do not allow now comes back THROTTLED with a retry-after; it is never an error and
never dropped. Rendering runs in worker processes under budgets (``render_pool``), and every
message is checked (``checks``) right before it would be handed to the provider: a message
that fails either is a permanent failure and is never sent.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import grpc

from sluice.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from sluice.common.grpcserver import duration_from_seconds
from sluice.common.logging import redact_email
from sluice.common.metrics import disabled_metrics
from sluice.common.providers import ProviderConfig
from sluice.common.telemetry import Telemetry, context_from_traceparent
from sluice.sender.checks import MessageChecks
from sluice.sender.metrics import SenderMetrics
from sluice.sender.providers.base import EmailProvider, OutboundEmail, ProviderResult
from sluice.sender.ratelimit import Grant, RateLimiter, even_requests, granted_of, jittered
from sluice.sender.render import RenderError, Template
from sluice.sender.render_pool import RenderPool
from sluice.v1 import sender_pb2, sender_pb2_grpc

log = logging.getLogger("sluice.sender")

_OUTCOMES = {
    "accepted": sender_pb2.SEND_OUTCOME_ACCEPTED,
    "transient": sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE,
    "permanent": sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE,
    "unavailable": sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE,
    "throttled": sender_pb2.SEND_OUTCOME_THROTTLED,
    "unknown": sender_pb2.SEND_OUTCOME_UNKNOWN,
}
_OUTCOME_NAMES = {
    sender_pb2.SEND_OUTCOME_UNSPECIFIED: "unspecified",
    sender_pb2.SEND_OUTCOME_ACCEPTED: "accepted",
    sender_pb2.SEND_OUTCOME_THROTTLED: "throttled",
    sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE: "transient",
    sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE: "permanent",
    sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE: "unavailable",
    sender_pb2.SEND_OUTCOME_UNKNOWN: "unknown",
}
MAX_MESSAGES = 5000


class SenderServicer(sender_pb2_grpc.SenderServiceServicer):
    """Sends batches within each provider's cluster-wide rate limits."""

    def __init__(
        self,
        providers: Mapping[str, ProviderConfig],
        adapters: Mapping[str, EmailProvider],
        limiter: RateLimiter,
        telemetry: Telemetry,
        metrics: SenderMetrics | None = None,
        *,
        render_pool: RenderPool,
        checks: MessageChecks | None = None,
    ) -> None:
        self._providers = providers
        self._adapters = adapters
        self._limiter = limiter
        self._telemetry = telemetry
        self._metrics = metrics if metrics is not None else SenderMetrics(disabled_metrics())
        self._render_pool = render_pool
        self._checks = checks or MessageChecks()

    def _provider(self, name: str) -> ProviderConfig:
        if not name:
            raise InvalidArgument("provider is required", [("provider", "required")])
        config = self._providers.get(name)
        if config is None:
            raise NotFound(
                f"provider {name!r} is not configured on this sender",
                metadata={"configured": ",".join(sorted(self._providers))},
            )
        return config

    async def SendBatch(
        self, request: sender_pb2.SendBatchRequest, context: grpc.aio.ServicerContext
    ) -> sender_pb2.SendBatchResponse:
        config = self._provider(request.provider)
        if not config.enabled:
            raise FailedPrecondition(f"provider {config.name!r} is disabled")
        messages = request.messages
        if len(messages) > MAX_MESSAGES:
            raise InvalidArgument(
                f"{len(messages)} messages in one batch",
                [("messages", f"at most {MAX_MESSAGES} messages")],
            )
        if not messages:
            return sender_pb2.SendBatchResponse()
        if not request.template.id:
            raise InvalidArgument("template is required", [("template.id", "required")])
        template = Template(
            id=request.template.id,
            version=request.template.version,
            subject=request.template.subject,
            html_body=request.template.html_body,
            text_body=request.template.text_body,
            variables=tuple(request.template.variables),
            from_address=request.template.from_address,
        )
        # Render and check only what the limits would allow now, then reserve exactly the
        # messages that can go, in the provider calls the adapter will make of them: the
        # reservation is taken right before the provider call, so rendering time never
        # sits between a grant and the send, and refused or unrenderable messages spend no
        # tokens. The preview cannot know the calls yet (SendGrid's depend on the rendered
        # content), so it assumes the fewest, and the reservation counts the real ones.
        # Both calls raise Unavailable (with a retry-after) when Redis is down: nothing is
        # sent then.
        adapter = self._adapters[config.name]
        preview = await self._limiter.preview(
            config, even_requests(len(messages), adapter.largest_request)
        )
        results: list[sender_pb2.SendResult | None] = [None] * len(messages)
        self._throttle(results, messages, range(preview.granted, len(messages)), preview)

        candidates: list[tuple[int, OutboundEmail]] = []
        rendered = await self._render_pool.render(
            template, [messages[i].variables for i in range(preview.granted)]
        )
        for i, out in enumerate(rendered):
            msg = messages[i]
            if isinstance(out, RenderError):
                results[i] = _permanent(msg.intent_id, f"render: {out}")
                continue
            email = OutboundEmail(
                intent_id=msg.intent_id,
                recipient=msg.recipient,
                from_address=template.from_address,
                subject=out.subject,
                html=out.html,
                text=out.text,
                idempotency_key=msg.idempotency_key,
                reply_to=msg.reply_to or request.template.reply_to,
                headers=tuple({**request.template.headers, **msg.headers}.items()),
                tags=tuple(msg.tags.items()),
                list_unsubscribe_url=msg.list_unsubscribe_url,
            )
            refusal = self._checks.refusal(
                intent_id=email.intent_id,
                idempotency_key=email.idempotency_key,
                recipient=email.recipient,
                from_address=email.from_address,
                subject=email.subject,
                reply_to=email.reply_to,
                headers=email.all_headers(),
                tags=email.all_tags(),
            )
            if refusal is not None:
                results[i] = _permanent(msg.intent_id, f"refused: {refusal}")
                continue
            candidates.append((i, email))

        plan = adapter.plan([email for _, email in candidates])
        grant = await self._limiter.acquire(config, [len(call) for call in plan])
        if grant.tokens_left is not None or grant.granted < len(messages):
            self._metrics.observe_grant(
                config.name, len(messages), grant.granted, grant.tokens_left or 0.0
            )
        chosen = granted_of(plan, grant)
        outbound = [candidates[c] for c in chosen]
        # More calls than the preview assumed, or another replica took the room between
        # preview and reservation. The adapter sends the granted messages in the calls
        # the plan made of them (see providers.base).
        left = sorted(set(range(len(candidates))) - set(chosen))
        self._throttle(results, messages, [candidates[c][0] for c in left], grant)

        with self._spans(config.name, [messages[i] for i, _ in outbound]):
            sent = await self._send(adapter, [email for _, email in outbound])
        for (i, email), result in zip(outbound, sent, strict=True):
            results[i] = sender_pb2.SendResult(
                intent_id=email.intent_id,
                outcome=_OUTCOMES[result.outcome],
                provider_message_id=result.provider_message_id,
                reason=result.reason,
                retry_after=duration_from_seconds(result.retry_after)
                if result.retry_after
                else None,
            )
            if result.outcome == "permanent":
                log.info(
                    "permanent failure",
                    extra={
                        "provider": config.name,
                        "intent_id": email.intent_id,
                        "recipient": redact_email(email.recipient),
                        "reason": result.reason,
                    },
                )
        await self._report(config, sent)
        done = [r for r in results if r is not None]
        assert len(done) == len(messages), "every message gets exactly one result"
        self._metrics.observe_outcomes(config.name, (_OUTCOME_NAMES[r.outcome] for r in done))
        return sender_pb2.SendBatchResponse(results=done)

    async def _report(self, config: ProviderConfig, sent: Sequence[ProviderResult]) -> None:
        """Hands the limiter what the provider's answers said, so every replica adapts: a
        rate refusal cuts the shared factor and pauses until its retry-after; a used-up
        quota, or a window with nothing left, only pauses; an announced request rate caps
        the configured one. Never fails the call: the messages were sent and must be
        answered."""
        throttles = [r for r in sent if r.outcome == "throttled"]
        announced = [r.announced for r in sent if r.announced is not None]
        pause = max([0.0, *(r.retry_after for r in throttles), *(a.reset_after for a in announced)])
        rates = [a.requests_per_second for a in announced if a.requests_per_second > 0]
        try:
            await self._limiter.report_throttled(
                config,
                retry_after=pause,
                published_rps=min(rates, default=0.0),
                throttled=any(not r.quota for r in throttles),
            )
        except Unavailable as exc:
            log.warning("could not report a throttle", extra={"error": str(exc)})

    @staticmethod
    def _throttle(
        results: list[sender_pb2.SendResult | None],
        messages: Sequence[sender_pb2.OutboundMessage],
        indices: Iterable[int],
        grant: Grant,
    ) -> None:
        retry_after = duration_from_seconds(jittered(grant.retry_after))
        for i in indices:
            results[i] = sender_pb2.SendResult(
                intent_id=messages[i].intent_id,
                outcome=sender_pb2.SEND_OUTCOME_THROTTLED,
                retry_after=retry_after,
            )

    async def _send(
        self, adapter: EmailProvider, emails: Sequence[OutboundEmail]
    ) -> list[ProviderResult]:
        if not emails:
            return []
        started = time.perf_counter()
        try:
            results = await adapter.send_batch(emails)
        except Unavailable as exc:
            # Nothing was handed to the provider (see the adapter contract).
            log.warning(
                "provider unavailable",
                extra={"provider": adapter.name, "messages": len(emails), "error": str(exc)},
            )
            return [
                ProviderResult(intent_id=e.intent_id, outcome="unavailable", reason=str(exc))
                for e in emails
            ]
        finally:
            self._metrics.observe_call(adapter.name, time.perf_counter() - started)
        if len(results) != len(emails):
            raise RuntimeError(
                f"provider {adapter.name} gave {len(results)} results for {len(emails)} messages"
            )
        return results

    @contextlib.contextmanager
    def _spans(
        self, provider: str, messages: Sequence[sender_pb2.OutboundMessage]
    ) -> Iterator[None]:
        """One span per message, each a child of its intent's trace (nothing when off)."""
        if not self._telemetry.enabled:
            yield
            return
        with contextlib.ExitStack() as stack:
            for msg in messages:
                span = self._telemetry.tracer.start_span(
                    "sluice.send",
                    context=context_from_traceparent(msg.traceparent),
                    attributes={"sluice.intent_id": msg.intent_id, "sluice.provider": provider},
                )
                stack.callback(span.end)
            yield

    async def GetCapacity(
        self, request: sender_pb2.GetCapacityRequest, context: grpc.aio.ServicerContext
    ) -> sender_pb2.GetCapacityResponse:
        names = (
            [self._provider(request.provider).name] if request.provider else sorted(self._providers)
        )
        out = []
        for name in names:
            config = self._providers[name]
            cap = await self._limiter.capacity(config)
            out.append(
                sender_pb2.ProviderCapacity(
                    provider=name,
                    sustained_tokens=cap.sustained_tokens,
                    sustained_rate=cap.sustained_rate,
                    burst_available=cap.burst_available,
                    burst=cap.burst,
                    unlimited=cap.unlimited,
                    request_tokens=cap.request_tokens,
                    requests_per_second=cap.requests_per_second,
                    request_burst_available=cap.request_burst_available,
                    request_burst=cap.request_burst,
                    daily_quota=cap.daily_quota,
                    daily_used=cap.daily_used,
                    adaptive_factor=cap.factor,
                    paused_for=duration_from_seconds(cap.paused_for),
                    published_requests_per_second=cap.published_rps,
                )
            )
        return sender_pb2.GetCapacityResponse(providers=out)


def _permanent(intent_id: str, reason: str) -> sender_pb2.SendResult:
    return sender_pb2.SendResult(
        intent_id=intent_id, outcome=sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE, reason=reason
    )
