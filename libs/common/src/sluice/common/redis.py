"""Redis client construction, shared by the services.

Redis holds only rate-limit and coordination state; losing it loses no intent.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sluice.common.errors import Unavailable
from sluice.common.logging import redact_url


async def create_redis(url: str, *, check: bool = True) -> aioredis.Redis:
    """A redis-py asyncio client for ``url``; pings it first unless ``check`` is False."""
    client = aioredis.Redis.from_url(url, health_check_interval=30, socket_connect_timeout=5)
    if check:
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise Unavailable(f"Redis at {redact_url(url)} is not answering: {exc}") from exc
    return client
