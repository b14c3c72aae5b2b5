"""Email provider adapters, and the factory that builds one from its configuration."""

from __future__ import annotations

import redis.asyncio as aioredis

from sluice.common.errors import ConfigError
from sluice.common.providers import ProviderConfig
from sluice.sender.providers.base import EmailProvider, OutboundEmail, Outcome, ProviderResult
from sluice.sender.providers.sandbox import SandboxLedger, SandboxProvider

__all__ = [
    "EmailProvider",
    "OutboundEmail",
    "Outcome",
    "ProviderResult",
    "SandboxLedger",
    "SandboxProvider",
    "build_provider",
]


def build_provider(config: ProviderConfig, *, redis: aioredis.Redis, prefix: str) -> EmailProvider:
    """The adapter for ``config.kind``; raises ``ConfigError`` for kinds not built yet."""
    if config.kind == "sandbox":
        return SandboxProvider(config, redis, prefix)
    raise ConfigError(f"provider {config.name!r}: kind {config.kind!r} has no adapter yet")
