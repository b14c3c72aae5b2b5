"""The Resend adapter (``kind = "resend"``), over its HTTP API with httpx.

Resend limits API *requests* (2 per second per team by default), not messages, so
messages go 100 at a time through ``POST /emails/batch`` (one alone through
``POST /emails``). Every request carries an ``Idempotency-Key`` derived from its intents'
keys, so the same messages sent again within Resend's 24 hours are not sent twice. A
request that timed out or lost its connection is sent once more at once with the same
key and the same body (the one case where a retry is certain to be identical); if that
too gets no answer, its messages answer ``unknown``.

Every answer carries Resend's rate-limit headers (IETF draft 6): ``ratelimit-limit``
requests per window (a second: Resend limits requests per second; a ``ratelimit-policy``
``N;w=W`` would name another window), ``ratelimit-remaining`` and ``ratelimit-reset``
(seconds until the window resets). They become ``Announced`` on every result: the rate
``limit / window``, and the reset when nothing remains.

Answer -> outcome (the README has the table): 200 accepted (the email id); 429
``rate_limit_exceeded`` throttled (``retry-after``, else ``ratelimit-reset``); 429
``daily_quota_exceeded`` /
``monthly_quota_exceeded`` throttled until the quota resets, with a paused_until reason;
409 ``concurrent_idempotent_requests`` transient (retry shortly); 409
``invalid_idempotent_request`` unknown (that key already sent something else); 400/422
validation permanent; 401/403 (key, permissions, unverified domain) and 404 unavailable
(nothing can be sent with this configuration); 500 transient; 502/504 unknown; no answer unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from sluice.common.errors import ConfigError, Unavailable
from sluice.common.providers import ProviderConfig, ResendSettings
from sluice.sender.providers import _http
from sluice.sender.providers.base import (
    Announced,
    EmailProvider,
    OutboundEmail,
    Plan,
    ProviderResult,
    announcing,
    consecutive,
    planned,
    provider_text,
    quota_results,
    results_for,
    send_in_chunks,
)

BATCH_LIMIT = 100  # Resend's documented maximum per /emails/batch call
_TAG_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_RETRY_PAUSE = 0.2
_LONGEST_QUOTA_WAIT = 32 * 86400.0  # a monthly quota resets within a month


def idempotency_key(messages: Sequence[OutboundEmail]) -> str:
    """A key for one request, stable across retries of the same messages, <= 256 chars.

    One message keeps its own key when it fits; several share a digest of theirs in
    order, so the same batch always maps to the same key and a different one never does.
    """
    keys = [m.idempotency_key or m.intent_id for m in messages]
    if len(keys) == 1 and 0 < len(keys[0]) <= 256:
        return keys[0]
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    return f"sluice-batch/{len(keys)}/{digest}"


def _tag(value: str) -> str:
    # Resend takes only ASCII letters, digits, '_' and '-' in tag names and values.
    return _TAG_CHARS.sub("_", value)[:256] or "_"


def payload(message: OutboundEmail) -> dict[str, Any]:
    """One email in Resend's JSON shape."""
    body: dict[str, Any] = {
        "from": message.from_address,
        "to": [message.recipient],
        "subject": message.subject,
        "html": message.html,
        "text": message.text,
        "tags": [{"name": _tag(k), "value": _tag(v)} for k, v in message.all_tags()],
    }
    if message.reply_to:
        body["reply_to"] = [message.reply_to]
    headers = dict(message.all_headers())
    if headers:
        body["headers"] = headers
    return body


class ResendProvider:
    """An ``EmailProvider`` for Resend, given an ``httpx.AsyncClient`` whose base URL and
    ``Authorization`` header point at the API."""

    def __init__(self, name: str, settings: ResendSettings, client: httpx.AsyncClient) -> None:
        self._name = name
        self._settings = settings
        self._client = client

    @property
    def name(self) -> str:
        """The configured provider name."""
        return self._name

    @property
    def largest_request(self) -> int:
        """At most 100 emails a request."""
        return BATCH_LIMIT

    def plan(self, messages: Sequence[OutboundEmail]) -> Plan:
        """Consecutive requests of at most 100 (one alone goes to ``/emails``)."""
        return consecutive(len(messages), BATCH_LIMIT)

    async def send_batch(self, messages: Sequence[OutboundEmail]) -> list[ProviderResult]:
        """Sends in the requests ``plan`` makes (see the module docstring)."""
        return await send_in_chunks(
            planned(messages, self.plan(messages)),
            self._send_request,
            concurrency=self._settings.max_connections,
        )

    async def _send_request(self, chunk: Sequence[OutboundEmail]) -> list[ProviderResult]:
        single = len(chunk) == 1
        body: Any = payload(chunk[0]) if single else [payload(m) for m in chunk]
        headers = {"Idempotency-Key": idempotency_key(chunk)}
        if not single:
            headers["x-batch-validation"] = self._settings.batch_validation
        path = "/emails" if single else "/emails/batch"
        response = await _http.post_json(self._client, path, body, headers)
        if response is None:
            # Same body, same key: Resend answers the first request's result if it got it.
            await asyncio.sleep(_RETRY_PAUSE)
            with contextlib.suppress(Unavailable):  # the first may still have arrived
                response = await _http.post_json(self._client, path, body, headers)
        if response is None:
            return results_for(chunk, "unknown", "resend: no answer (may have been received)")
        return announcing(self._results(chunk, response, single), announced(response.headers))

    def _results(
        self, chunk: Sequence[OutboundEmail], response: httpx.Response, single: bool
    ) -> list[ProviderResult]:
        data = _http.json_or_empty(response)
        status = response.status_code
        if status == 200:
            if single:
                return [ProviderResult(chunk[0].intent_id, "accepted", str(data.get("id", "")))]
            return _batch_results(chunk, data)
        error = str(data.get("name", "")) or f"http_{status}"
        reason = f"resend {status} {error}: {provider_text(str(data.get('message', '')))}"
        if status == 429:
            if "quota" in error:
                return quota_results(chunk, reason, _quota_reset(error, response))
            return results_for(chunk, "throttled", reason, _rate_wait(response.headers))
        if status == 409:
            if error == "concurrent_idempotent_requests":
                return results_for(chunk, "transient", reason, 1.0)
            return results_for(chunk, "unknown", reason)
        # The key, its permissions or the sending domain are wrong: nothing can be sent
        # through this provider as configured, which is no fault of the message.
        if status in (401, 403, 404, 405):
            return results_for(chunk, "unavailable", reason)
        if status in (502, 504):
            return results_for(chunk, "unknown", reason)
        if status >= 500:
            return results_for(
                chunk, "transient", reason, _http.wait(_http.retry_after(response.headers))
            )
        return results_for(chunk, "permanent", reason)


def _batch_results(chunk: Sequence[OutboundEmail], data: dict[str, Any]) -> list[ProviderResult]:
    # Permissive validation: ``data`` has the created emails in order, ``errors`` the
    # indexes of the refused ones.
    errors = {
        int(e["index"]): str(e.get("message", "invalid"))
        for e in data.get("errors") or []
        if isinstance(e, dict) and isinstance(e.get("index"), int)
    }
    ids = iter(str(d.get("id", "")) for d in data.get("data") or [] if isinstance(d, dict))
    results = []
    for i, message in enumerate(chunk):
        if i in errors:
            results.append(
                ProviderResult(
                    message.intent_id, "permanent", reason=f"resend: {provider_text(errors[i])}"
                )
            )
        else:
            provider_id = next(ids, "")
            if provider_id:
                results.append(ProviderResult(message.intent_id, "accepted", provider_id))
            else:  # fewer ids than valid emails: Resend's answer does not say which
                results.append(ProviderResult(message.intent_id, "unknown", reason="no id"))
    return results


def announced(headers: httpx.Headers) -> Announced | None:
    """What Resend's rate-limit headers say (see the module docstring); None when absent."""
    limit = _http.number(headers.get("ratelimit-limit"))
    remaining = _http.number(headers.get("ratelimit-remaining"))
    reset = _http.number(headers.get("ratelimit-reset"))
    if limit is None and remaining is None:
        return None
    window = _policy_window(headers.get("ratelimit-policy"))
    rate = limit / window if limit is not None and limit > 0 else 0.0
    if not math.isfinite(rate):
        rate = 0.0
    exhausted = remaining is not None and remaining <= 0 and reset is not None and reset > 0
    return Announced(rate, _http.wait(reset) if exhausted else 0.0)


def _policy_window(policy: str | None) -> float:
    # "10;w=1" (draft 6): the first policy's window in seconds; Resend's is one second.
    for param in (policy or "").split(",")[0].split(";")[1:]:
        name, _, value = param.strip().partition("=")
        seconds = _http.number(value) if name == "w" else None
        if seconds is not None and seconds > 0:
            return seconds
    return 1.0


def _rate_wait(headers: httpx.Headers) -> float:
    seconds = _http.retry_after(headers)
    if seconds is None:
        seconds = _http.number(headers.get("ratelimit-reset"))
    return _http.wait(seconds)


def _quota_reset(error: str, response: httpx.Response) -> datetime:
    now = datetime.now(UTC)
    seconds = _http.retry_after(response.headers)
    if seconds is not None:
        return now + timedelta(seconds=min(max(1.0, seconds), _LONGEST_QUOTA_WAIT))
    if error.startswith("monthly"):
        year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
        return datetime(year, month, 1, tzinfo=UTC)
    return _http.next_utc_midnight(now)


async def open_adapter(
    config: ProviderConfig, stack: contextlib.AsyncExitStack, resources: Any
) -> EmailProvider:
    """Factory: opens the httpx client (closed with ``stack``) with the API key."""
    settings = config.settings
    if not isinstance(settings, ResendSettings):
        raise ConfigError(f"provider {config.name!r}: not a resend provider")
    key = settings.api_key.reveal(resources.environ, f"provider {config.name!r}: api_key")
    client = _http.open_client(
        settings.base_url,
        {"Authorization": f"Bearer {key}", "User-Agent": "sluice-sender"},
        settings.timeout_seconds,
        settings.max_connections,
    )
    await stack.enter_async_context(client)
    return ResendProvider(config.name, settings, client)
