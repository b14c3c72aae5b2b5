"""The SendGrid adapter (``kind = "sendgrid"``), over its v3 ``mail/send`` with httpx.

Messages whose content is the same (from, reply-to, HTML and text bodies) go in one
request as personalizations, at most 1,000 a request and each recipient once (SendGrid
refuses a request naming an address twice); each personalization carries its own
subject, headers (List-Unsubscribe) and ``custom_args`` with the intent id, which
SendGrid's event webhook sends back. Different content means separate requests.

Every answer carries ``X-RateLimit-Limit`` (requests per refresh period), ``-Remaining``
and ``-Reset`` (the Unix time the period ends). SendGrid does not say how long a period
is, so no rate is derived from the limit; an answer with nothing remaining announces the
wait until the reset (``Announced.reset_after``), which pauses every replica until then.

Answer -> outcome (the README has the table): 202 accepted (queued, not delivered; every
message of the request gets the request's ``X-Message-Id``, which SendGrid's events
carry as the prefix of ``sg_message_id``); 429 throttled (``Retry-After``, else until
``X-RateLimit-Reset``); 400
permanent (a request of several personalizations is split and sent one by one once, so
one bad message does not fail the others); 413 permanent; 401/403 unavailable (the key or
sender identity is wrong: nothing can be sent); 500/503 transient; 502/504 and no answer
unknown (SendGrid takes no idempotency key, so those are not retried here).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from email.utils import parseaddr
from typing import Any

import httpx

from sluice.common.errors import ConfigError, Unavailable
from sluice.common.providers import ProviderConfig, SendGridSettings
from sluice.sender.providers import _http
from sluice.sender.providers.base import (
    Announced,
    EmailProvider,
    OutboundEmail,
    Plan,
    ProviderResult,
    announcing,
    planned,
    provider_text,
    results_for,
    send_in_chunks,
)

PERSONALIZATION_LIMIT = 1000  # SendGrid's documented maximum per request
PATH = "/v3/mail/send"


def _content_key(m: OutboundEmail) -> tuple[str, str, str, str]:
    return (m.from_address, m.reply_to, m.html, m.text)


def pack(messages: Sequence[OutboundEmail]) -> Plan:
    """Requests, in the order they open: messages of the same content together, <= 1,000
    each, recipients unique.

    Packing only appends, in message order, so the messages of the first k requests (the
    last one possibly cut short) pack into those same k requests again: what the rate
    limiter granted of a plan is sent as planned.
    """
    requests: Plan = []
    open_by_content: dict[tuple[str, str, str, str], tuple[list[int], set[str]]] = {}
    for index, message in enumerate(messages):
        key = _content_key(message)
        current = open_by_content.get(key)
        address = message.recipient.lower()
        if current is None or len(current[0]) >= PERSONALIZATION_LIMIT or address in current[1]:
            current = ([], set())
            open_by_content[key] = current
            requests.append(current[0])
        current[0].append(index)
        current[1].add(address)
    return requests


def _address(value: str) -> dict[str, str]:
    name, address = parseaddr(value)
    out = {"email": address or value.strip()}
    if name:
        out["name"] = name
    return out


def payload(request: Sequence[OutboundEmail]) -> dict[str, Any]:
    """One ``mail/send`` body for messages that share their content."""
    first = request[0]
    personalizations = []
    for m in request:
        p: dict[str, Any] = {
            "to": [{"email": m.recipient}],
            "subject": m.subject,
            "custom_args": dict(m.all_tags()),
        }
        headers = dict(m.all_headers())
        if headers:
            p["headers"] = headers
        personalizations.append(p)
    content = []
    if first.text:
        content.append({"type": "text/plain", "value": first.text})
    if first.html:
        content.append({"type": "text/html", "value": first.html})
    body: dict[str, Any] = {
        "personalizations": personalizations,
        "from": _address(first.from_address),
        "content": content,
    }
    if first.reply_to:
        body["reply_to"] = _address(first.reply_to)
    return body


class SendGridProvider:
    """An ``EmailProvider`` for SendGrid, given an ``httpx.AsyncClient`` whose base URL and
    ``Authorization`` header point at the API."""

    def __init__(self, name: str, settings: SendGridSettings, client: httpx.AsyncClient) -> None:
        self._name = name
        self._settings = settings
        self._client = client

    @property
    def name(self) -> str:
        """The configured provider name."""
        return self._name

    @property
    def largest_request(self) -> int:
        """At most 1,000 personalizations a request (when the content is the same)."""
        return PERSONALIZATION_LIMIT

    def plan(self, messages: Sequence[OutboundEmail]) -> Plan:
        """Personalizations of the same content in one request (``pack``)."""
        return pack(messages)

    async def send_batch(self, messages: Sequence[OutboundEmail]) -> list[ProviderResult]:
        """Packs into personalizations and sends (see the module docstring)."""
        plan = self.plan(messages)
        results = await send_in_chunks(
            planned(messages, plan), self._send_request, concurrency=self._settings.max_connections
        )
        # Packing groups by content, so results come back grouped: put them in order.
        by_position = dict(zip((i for call in plan for i in call), results, strict=True))
        return [by_position[i] for i in range(len(messages))]

    async def _send_request(
        self, request: Sequence[OutboundEmail], *, split_on_400: bool = True
    ) -> list[ProviderResult]:
        response = await _http.post_json(self._client, PATH, payload(request))
        if response is None:
            return results_for(request, "unknown", "sendgrid: no answer (may have been received)")
        if response.status_code == 400 and split_on_400 and len(request) > 1:
            # One bad message must not fail the others: send them one by one, once.
            results: list[ProviderResult] = []
            for m in request:
                results.extend(await self._send_one_after_400(m))
            return results
        return announcing(_results(request, response), announced(response.headers))

    async def _send_one_after_400(self, message: OutboundEmail) -> list[ProviderResult]:
        try:
            return await self._send_request([message], split_on_400=False)
        except Unavailable as exc:  # this one was not handed over; others were
            return [ProviderResult(message.intent_id, "unavailable", reason=str(exc))]


def _results(request: Sequence[OutboundEmail], response: httpx.Response) -> list[ProviderResult]:
    status = response.status_code
    if status == 202:
        message_id = response.headers.get("x-message-id", "")
        return [ProviderResult(m.intent_id, "accepted", message_id) for m in request]
    reason = f"sendgrid {status}: {_errors(response)}"
    if status == 429:
        return results_for(request, "throttled", reason, _rate_wait(response.headers))
    if status in (401, 403):
        return results_for(request, "unavailable", reason)
    if status in (502, 504):
        return results_for(request, "unknown", reason)
    if status >= 500:
        return results_for(
            request, "transient", reason, _http.wait(_http.retry_after(response.headers))
        )
    return results_for(request, "permanent", reason)


def announced(headers: httpx.Headers) -> Announced | None:
    """The wait until ``X-RateLimit-Reset`` when ``X-RateLimit-Remaining`` is 0, else None
    (see the module docstring)."""
    remaining = _http.number(headers.get("x-ratelimit-remaining"))
    until = _seconds_to_reset(headers)
    if remaining is None or remaining > 0 or until is None or until <= 0:
        return None
    return Announced(reset_after=_http.wait(until))


def _seconds_to_reset(headers: httpx.Headers) -> float | None:
    reset = _http.number(headers.get("x-ratelimit-reset"))
    return None if reset is None else reset - time.time()


def _rate_wait(headers: httpx.Headers) -> float:
    seconds = _http.retry_after(headers)
    return _http.wait(seconds if seconds is not None else _seconds_to_reset(headers))


def _errors(response: httpx.Response) -> str:
    errors = _http.json_or_empty(response).get("errors")
    if isinstance(errors, list):
        parts = [
            f"{e.get('field') or ''}: {e.get('message', '')}".strip(": ")
            for e in errors
            if isinstance(e, dict)
        ]
        return provider_text("; ".join(parts), 300)
    return response.reason_phrase


async def open_adapter(
    config: ProviderConfig, stack: contextlib.AsyncExitStack, resources: Any
) -> EmailProvider:
    """Factory: opens the httpx client (closed with ``stack``) with the API key."""
    settings = config.settings
    if not isinstance(settings, SendGridSettings):
        raise ConfigError(f"provider {config.name!r}: not a sendgrid provider")
    key = settings.api_key.reveal(resources.environ, f"provider {config.name!r}: api_key")
    client = _http.open_client(
        settings.base_url,
        {"Authorization": f"Bearer {key}", "User-Agent": "sluice-sender"},
        settings.timeout_seconds,
        settings.max_connections,
    )
    await stack.enter_async_context(client)
    return SendGridProvider(config.name, settings, client)
