"""The webhook endpoint: an aiohttp application ingest serves on its own port.

Routes::

    POST /webhooks/ses          SNS (SES events, subscription confirmations)
    POST /webhooks/resend       Svix-signed Resend events
    POST /webhooks/sendgrid     signed SendGrid Event Webhook batches
    POST /unsubscribe/{token}   RFC 8058 one-click unsubscribe (List-Unsubscribe=One-Click)
    GET  /unsubscribe/{token}   a page with a button that POSTs the same (never unsubscribes
                                by itself: mail scanners follow links)
    GET  /healthz               200 while serving

Every request is verified before its body is parsed into state. Refusals: 401 (no or bad
signature), 400 (stale, malformed, topic not allowed, bad token), 404 (a provider that is
not configured), 413 (body over the limit). A redelivered event is answered 200 and changes
nothing (the provider must stop retrying). Each outcome is counted in
``sluice_webhook_requests_total{source,outcome}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web

from sluice.common.errors import InvalidArgument, Unavailable
from sluice.common.metrics import HealthFlag
from sluice.common.unsubscribe import BadToken, read_token
from sluice.ingest.webhooks import sendgrid_sig, svix
from sluice.ingest.webhooks.config import WebhookConfig
from sluice.ingest.webhooks.errors import WebhookRejected, malformed
from sluice.ingest.webhooks.events import DeliveryEvent, Source
from sluice.ingest.webhooks.metrics import WebhookMetrics
from sluice.ingest.webhooks.parse import parse_resend, parse_sendgrid, parse_ses
from sluice.ingest.webhooks.sns import SnsVerifier
from sluice.ingest.webhooks.writer import EventWriter

log = logging.getLogger("sluice.ingest.webhooks")

Clock = Callable[[], float]

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Unsubscribe</title></head>
<body><form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button></form></body></html>"""


class Webhooks:
    """The handlers and what they share; see the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        config: WebhookConfig,
        writer: EventWriter,
        metrics: WebhookMetrics,
        sns: SnsVerifier | None,
        clock: Clock = time.time,
    ) -> None:
        self.pool = pool
        self.config = config
        self.writer = writer
        self.metrics = metrics
        self.sns = sns
        self.clock = clock
        #: What /healthz answers (the listener's serving flag once attached).
        self.health = HealthFlag()

    async def _store(self, source: str, events: Sequence[DeliveryEvent]) -> web.Response:
        if not events:
            self.metrics.request(source, "ignored")
            return web.Response(text="no delivery events\n")
        result = await self.writer.write(events)
        fresh = [e for e in events if (e.source, e.event_id) in result.fresh]
        for e in fresh:
            self.metrics.events.labels(source, e.type).inc()
        self.metrics.request(source, "accepted" if fresh else "duplicate")
        return web.Response(text=f"stored {len(fresh)} of {len(events)}\n")

    async def ses(self, request: web.Request) -> web.Response:
        if self.sns is None or not self.config.ses_topics:
            raise WebhookRejected(404, "unconfigured", "SES webhooks are not configured")
        body = await request.read()
        message = await self.sns.verify(body, now=self.clock())
        kind = message["Type"]
        if kind == "SubscriptionConfirmation":
            await self.sns.confirm(message)
            self.metrics.request("ses", "subscribed")
            log.info("confirmed the SNS subscription to an allowed topic")
            return web.Response(text="subscription confirmed\n")
        if kind == "UnsubscribeConfirmation":
            self.metrics.request("ses", "unsubscribed")
            return web.Response(text="ok\n")
        if not isinstance(message.get("Message"), str):
            raise malformed("the SNS Notification has no Message")
        return await self._store("ses", parse_ses(str(message["MessageId"]), message["Message"]))

    async def resend(self, request: web.Request) -> web.Response:
        if not self.config.resend_keys:
            raise WebhookRejected(404, "unconfigured", "Resend webhooks are not configured")
        body = await request.read()
        msg_id = svix.verify(
            self.config.resend_keys,
            request.headers,
            body,
            now=self.clock(),
            tolerance=self.config.tolerance,
        )
        return await self._store("resend", parse_resend(msg_id, body))

    async def sendgrid(self, request: web.Request) -> web.Response:
        if self.config.sendgrid_key is None:
            raise WebhookRejected(404, "unconfigured", "SendGrid webhooks are not configured")
        body = await request.read()
        sendgrid_sig.verify(
            self.config.sendgrid_key,
            request.headers,
            body,
            now=self.clock(),
            tolerance=self.config.tolerance,
        )
        return await self._store("sendgrid", parse_sendgrid(body))

    def _token(self, request: web.Request) -> uuid.UUID:
        if not self.config.unsubscribe_secret:
            raise WebhookRejected(404, "unconfigured", "unsubscribe links are not configured")
        try:
            return read_token(
                self.config.unsubscribe_secret, request.match_info["token"], now=self.clock()
            )
        except BadToken as exc:
            raise WebhookRejected(400, "bad_token", str(exc)) from None

    async def unsubscribe_page(self, request: web.Request) -> web.Response:
        self._token(request)
        return web.Response(text=_PAGE, content_type="text/html")

    async def unsubscribe(self, request: web.Request) -> web.Response:
        intent_id = self._token(request)
        form = await request.post()
        if form.get("List-Unsubscribe") != "One-Click":
            raise malformed("the body must be List-Unsubscribe=One-Click (RFC 8058)")
        recipient = await self.pool.fetchval(
            "SELECT recipient FROM intents WHERE id = $1", intent_id
        )
        if recipient is None:
            raise WebhookRejected(404, "unknown_intent", "no such message")
        event = DeliveryEvent(
            source="unsubscribe",
            # one unsubscription per message: a second click changes nothing
            event_id=str(intent_id),
            type="unsubscribed",
            occurred_at=datetime.fromtimestamp(self.clock(), UTC),
            provider_message_id=None,
            intent_id=intent_id,
            recipient=str(recipient),
            detail="one-click unsubscribe",
        )
        await self._store("unsubscribe", [event])
        return web.Response(text="unsubscribed\n")

    async def healthz(self, request: web.Request) -> web.Response:
        if self.health.serving:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="not serving\n")


def _source_of(request: web.Request) -> str:
    path = request.path
    for source in ("ses", "resend", "sendgrid"):
        if path == f"/webhooks/{source}":
            return source
    return "unsubscribe" if path.startswith("/unsubscribe/") else "other"


def _middleware(hooks: Webhooks) -> Any:
    @web.middleware
    async def refuse_and_count(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        source = _source_of(request)
        try:
            return await handler(request)
        except WebhookRejected as exc:
            hooks.metrics.request(source, exc.reason)
            log.info("refused a %s webhook: %s (%s)", source, exc.reason, exc)
            return web.Response(status=exc.status, text=f"{exc.reason}: {exc}\n")
        except web.HTTPRequestEntityTooLarge:
            hooks.metrics.request(source, "too_large")
            return web.Response(status=413, text="too_large: body over the limit\n")
        except web.HTTPException:
            raise
        except InvalidArgument as exc:
            # a value the database refused (it passed parsing): the request is at fault
            hooks.metrics.request(source, "malformed")
            return web.Response(status=400, text=f"malformed: {exc.message}\n")
        except (Unavailable, OSError) as exc:
            # The provider retries a 5xx later; nothing was committed.
            hooks.metrics.request(source, "unavailable")
            log.warning("a %s webhook could not be stored: %s", source, exc)
            return web.Response(status=503, text="unavailable: try again\n")
        except asyncio.CancelledError:
            raise
        except Exception:
            hooks.metrics.request(source, "error")
            log.exception("a %s webhook failed", source)
            return web.Response(status=500, text="internal error\n")

    return refuse_and_count


def build_app(hooks: Webhooks) -> web.Application:
    """The aiohttp application for ``hooks``, with the configured body-size limit."""
    app = web.Application(
        client_max_size=hooks.config.max_body_bytes, middlewares=[_middleware(hooks)]
    )
    app.router.add_post("/webhooks/ses", hooks.ses)
    app.router.add_post("/webhooks/resend", hooks.resend)
    app.router.add_post("/webhooks/sendgrid", hooks.sendgrid)
    app.router.add_post("/unsubscribe/{token}", hooks.unsubscribe)
    app.router.add_get("/unsubscribe/{token}", hooks.unsubscribe_page)
    app.router.add_get("/healthz", hooks.healthz)
    return app


__all__ = ["Source", "Webhooks", "build_app"]
