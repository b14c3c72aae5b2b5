"""The ``sandbox`` provider: accepts mail without sending it, and records what it got.

It stands in for a real provider in local runs and tests. Outcomes depend on the
recipient's domain (options, comma-separated, matched case-insensitively):

- ``fail_domains`` (default ``fail.sandbox.example``): permanent failure, mailbox does not exist
- ``flaky_domains`` (default ``flaky.sandbox.example``): transient failure
- anything else: accepted, with a ``sandbox-<hex>`` message id

``latency_ms`` (default 0) delays each batch's answer like a provider's round trip.
Accepted mail is recorded in Redis, shared across sender processes, so tests and the demo
can count deliveries and check the provider's rate limits were kept (keys hash-tagged by
provider name)::

    {prefix}:sandbox:{<name>}:count   total accepted
    {prefix}:sandbox:{<name>}:log     one "<unix_time_us>:<accepted>" per batch (last 100,000)
    {prefix}:sandbox:{<name>}:ids     accepted intent ids (last 1,000,000; option record_ids)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sluice.common.errors import ConfigError, Unavailable
from sluice.common.providers import ProviderConfig
from sluice.sender.providers.base import OutboundEmail, ProviderResult

LOG_LIMIT = 100_000
IDS_LIMIT = 1_000_000


def sandbox_key(prefix: str, provider: str, what: str) -> str:
    """The Redis key of one sandbox record (``count``, ``log`` or ``ids``)."""
    return f"{prefix}:sandbox:{{{provider}}}:{what}"


def _domains(raw: str) -> frozenset[str]:
    return frozenset(d.strip().lower() for d in raw.split(",") if d.strip())


class SandboxProvider:
    """An ``EmailProvider`` that sends nothing and records what it accepted."""

    def __init__(self, config: ProviderConfig, redis: aioredis.Redis, prefix: str) -> None:
        options = config.options
        self._name = config.name
        self._redis = redis
        self._fail = _domains(options.get("fail_domains", "fail.sandbox.example"))
        self._flaky = _domains(options.get("flaky_domains", "flaky.sandbox.example"))
        try:
            self._latency = float(options.get("latency_ms", "0")) / 1000
        except ValueError as exc:
            raise ConfigError(f"provider {config.name!r}: latency_ms must be a number") from exc
        if self._latency < 0:
            raise ConfigError(f"provider {config.name!r}: latency_ms must not be negative")
        self._record_ids = options.get("record_ids", "true").strip().lower() == "true"
        self._count_key = sandbox_key(prefix, config.name, "count")
        self._log_key = sandbox_key(prefix, config.name, "log")
        self._ids_key = sandbox_key(prefix, config.name, "ids")

    @property
    def name(self) -> str:
        """The configured provider name."""
        return self._name

    async def send_batch(self, messages: Sequence[OutboundEmail]) -> list[ProviderResult]:
        """Answers every message by its recipient's domain and records the accepted ones.

        Raises ``Unavailable`` when the record cannot be written: for the sandbox the
        record is the delivery, so nothing unrecorded may be reported accepted.
        """
        sent_at_us = time.time_ns() // 1000  # when a real provider would see the request
        results = [self._answer(m) for m in messages]
        accepted = [r.intent_id for r in results if r.outcome == "accepted"]
        if accepted:
            await self._record(sent_at_us, accepted)
        if self._latency:
            await asyncio.sleep(self._latency)
        return results

    def _answer(self, message: OutboundEmail) -> ProviderResult:
        domain = message.recipient.rpartition("@")[2].lower()
        if domain in self._fail:
            return ProviderResult(message.intent_id, "permanent", reason="mailbox does not exist")
        if domain in self._flaky:
            return ProviderResult(
                message.intent_id, "transient", reason="sandbox: simulated temporary failure"
            )
        return ProviderResult(
            message.intent_id, "accepted", provider_message_id=f"sandbox-{uuid.uuid4().hex}"
        )

    async def _record(self, sent_at_us: int, accepted: list[str]) -> None:
        # One MULTI per batch: the count, the log and the ids never disagree. All keys share
        # the provider's hash tag, so this works on Redis Cluster too.
        pipe = self._redis.pipeline(transaction=True)
        pipe.incrby(self._count_key, len(accepted))
        pipe.rpush(self._log_key, f"{sent_at_us}:{len(accepted)}")
        pipe.ltrim(self._log_key, -LOG_LIMIT, -1)
        if self._record_ids:
            pipe.rpush(self._ids_key, *accepted)
            pipe.ltrim(self._ids_key, -IDS_LIMIT, -1)
        with _unavailable(f"sandbox provider {self._name!r}"):
            await pipe.execute()

    async def aclose(self) -> None:
        """Nothing to release: the Redis client belongs to the caller."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class SandboxLedger:
    """Reads what sandbox providers accepted, across every sender process."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    async def sent_count(self, provider: str) -> int:
        """Messages the provider accepted in total."""
        with _unavailable("sandbox ledger"):
            raw = await self._redis.get(sandbox_key(self._prefix, provider, "count"))
        return int(raw) if raw is not None else 0

    async def send_log(self, provider: str) -> list[tuple[int, int]]:
        """(unix time µs, accepted) per batch, oldest first."""
        with _unavailable("sandbox ledger"):
            raw = await self._redis.lrange(sandbox_key(self._prefix, provider, "log"), 0, -1)
        entries = []
        for item in raw:
            at_us, _, count = _text(item).partition(":")
            entries.append((int(at_us), int(count)))
        return entries

    async def sent_ids(self, provider: str) -> list[str]:
        """Intent ids the provider accepted, oldest first (when it records them)."""
        with _unavailable("sandbox ledger"):
            raw = await self._redis.lrange(sandbox_key(self._prefix, provider, "ids"), 0, -1)
        return [_text(item) for item in raw]


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except RedisError as exc:
        raise Unavailable(f"{what}: {exc}") from exc
