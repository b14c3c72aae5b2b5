"""Email provider adapters, and the one registry from provider kind to factory.

A factory opens exactly the client its adapter needs (an ``httpx.AsyncClient``, an
aioboto3 SES client, an SMTP pool) on the exit stack it is given, so the wiring closes
them in order; tests build adapters directly with clients pointed at local stand-ins.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

from sluice.common.errors import ConfigError
from sluice.common.providers import ProviderConfig
from sluice.sender.providers.base import (
    EmailProvider,
    OutboundEmail,
    Outcome,
    ProviderResult,
    ReadsAccountLimits,
)
from sluice.sender.providers.sandbox import SandboxLedger, SandboxProvider

__all__ = [
    "ADAPTER_MODULES",
    "AdapterResources",
    "EmailProvider",
    "OutboundEmail",
    "Outcome",
    "ProviderResult",
    "SandboxLedger",
    "SandboxProvider",
    "account_limits",
    "build_adapters",
    "factory",
]


@dataclass(frozen=True)
class AdapterResources:
    """What factories may use besides their own config: the sandbox's Redis ledger, and
    the environment ``*_env`` secrets are read from."""

    redis: aioredis.Redis
    prefix: str
    environ: Mapping[str, str]


Factory = Callable[
    [ProviderConfig, contextlib.AsyncExitStack, AdapterResources], Awaitable[EmailProvider]
]


async def _sandbox(
    config: ProviderConfig, stack: contextlib.AsyncExitStack, res: AdapterResources
) -> EmailProvider:
    return SandboxProvider(config, res.redis, res.prefix)


# Kind -> the module whose ``open_adapter`` builds it. Imported only when a provider of
# that kind is configured: aioboto3 alone adds seconds to a loaded machine's start-up.
ADAPTER_MODULES: dict[str, str] = {
    "ses": "sluice.sender.providers.ses",
    "resend": "sluice.sender.providers.resend",
    "sendgrid": "sluice.sender.providers.sendgrid",
    "smtp": "sluice.sender.providers.smtp",
}


def factory(kind: str) -> Factory:
    """The factory of one provider kind (``ConfigError`` for a kind with no adapter)."""
    if kind == "sandbox":
        return _sandbox
    module = ADAPTER_MODULES.get(kind)
    if module is None:
        raise ConfigError(f"provider kind {kind!r} has no adapter")
    return cast(Factory, importlib.import_module(module).open_adapter)


async def build_adapters(
    configs: Iterable[ProviderConfig],
    stack: contextlib.AsyncExitStack,
    *,
    redis: aioredis.Redis,
    prefix: str,
    environ: Mapping[str, str] | None = None,
) -> dict[str, EmailProvider]:
    """One adapter per provider, by name; their clients are closed when ``stack`` is.

    Resolves credentials (``ConfigError`` when one is missing), so a sender with a
    wrong secret stops at start-up rather than at its first send.
    """
    resources = AdapterResources(redis, prefix, os.environ if environ is None else environ)
    adapters: dict[str, EmailProvider] = {}
    for config in configs:
        adapters[config.name] = await factory(config.kind)(config, stack, resources)
    return adapters


async def account_limits(
    configs: Iterable[ProviderConfig], adapters: Mapping[str, EmailProvider]
) -> dict[str, ProviderConfig]:
    """Every provider's configuration by name, with the limits its account allows where
    its adapter reads them at start-up (SES with ``read_quota``) and they are lower."""
    out: dict[str, ProviderConfig] = {}
    for config in configs:
        adapter = adapters[config.name]
        if isinstance(adapter, ReadsAccountLimits):
            config = await adapter.account_limits(config)
        out[config.name] = config
    return out
