"""What the HTTP adapters (Resend, SendGrid) share: one POST that tells "not handed over"
from "maybe received", the parsing of header values (each adapter decides what its
provider's headers mean), and the client they are given."""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from sluice.common.errors import Unavailable

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


def number(value: str | None) -> float | None:
    """A header's numeric value, or None when it is absent or not a finite number."""
    if value is None:
        return None
    try:
        parsed = float(value.strip())
    except ValueError:
        return None
    return parsed if math.isfinite(parsed) else None


def retry_after(headers: httpx.Headers) -> float | None:
    """The standard ``Retry-After`` (delta-seconds or an HTTP date) in seconds, or None."""
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = number(value)
    if seconds is not None:
        return seconds
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError):
        return None


def wait(seconds: float | None, default: float = 1.0) -> float:
    """A wait to tell the limiter: ``default`` when unknown, bounded to (0.05 s, 1 h)."""
    if seconds is None:
        return default
    return min(MAX_WAIT, max(0.05, seconds))


def next_utc_midnight(now: datetime | None = None) -> datetime:
    """When a daily quota counted per UTC day resets."""
    now = now or datetime.now(UTC)
    return (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)


def json_or_empty(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object, or {} when it has none."""
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {"data": data}
