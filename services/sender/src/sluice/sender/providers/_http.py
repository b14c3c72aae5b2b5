"""What the HTTP adapters (Resend, SendGrid) share: one POST that tells "not handed over"
from "maybe received", rate-limit header parsing, and the client they are given."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from sluice.common.errors import Unavailable
from sluice.sender.providers.base import QUOTA_REASON

# Headers whose value is a number of seconds to wait, in the order they are trusted.
_SECONDS_HEADERS = ("retry-after", "ratelimit-reset")
# Headers whose value is the Unix time the limit resets (SendGrid's X-RateLimit-Reset).
_EPOCH_HEADERS = ("x-ratelimit-reset",)
MAX_WAIT = 3600.0


def open_client(
    base_url: str, headers: Mapping[str, str], timeout: float, connections: int
) -> httpx.AsyncClient:
    """The client a factory opens for one provider (the caller closes it)."""
    return httpx.AsyncClient(
        base_url=base_url,
        headers=dict(headers),
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        follow_redirects=False,
    )


async def post_json(
    client: httpx.AsyncClient, path: str, body: Any, headers: Mapping[str, str] | None = None
) -> httpx.Response | None:
    """POSTs ``body``; ``None`` when the request may have reached the provider but no
    answer came back (read timeout, cut connection). Raises ``Unavailable`` when it surely
    did not (no connection could be made, or no pooled connection was free in time)."""
    try:
        return await client.post(path, json=body, headers=dict(headers or {}))
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise Unavailable(f"{client.base_url.host}: {type(exc).__name__}: {exc}") from exc
    except httpx.TransportError:
        return None


def retry_after(headers: httpx.Headers, default: float = 1.0) -> float:
    """Seconds to wait before the next request, from the answer's rate-limit headers."""
    for name in _SECONDS_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            parsed = _http_date(value)
            if parsed is None:
                continue
            seconds = parsed - time.time()
        return _bounded(seconds, default)
    for name in _EPOCH_HEADERS:
        value = headers.get(name)
        if value is not None:
            try:
                return _bounded(float(value) - time.time(), default)
            except ValueError:
                continue
    return default


def _http_date(value: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _bounded(seconds: float, default: float) -> float:
    if seconds != seconds:  # NaN
        return default
    return min(MAX_WAIT, max(0.05, seconds))


def next_utc_midnight(now: datetime | None = None) -> datetime:
    """When a daily quota counted per UTC day resets."""
    now = now or datetime.now(UTC)
    return (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)


def quota_reason(what: str, until: datetime) -> str:
    """The reason of a quota pause (``QUOTA_REASON`` and a paused_until time the router
    can read)."""
    return f"{QUOTA_REASON}; paused_until={until.strftime('%Y-%m-%dT%H:%M:%SZ')}; {what}"


def json_or_empty(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object, or {} when it has none."""
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {"data": data}
