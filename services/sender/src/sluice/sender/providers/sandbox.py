"""The ``sandbox`` provider: accepts mail without sending it, and records what it got.

It stands in for a real provider in local runs and tests. Outcomes depend on the
recipient's domain (``SandboxSettings``, matched case-insensitively):

- ``fail_domains`` (default ``fail.sandbox.example``): permanent failure, mailbox does not exist
- ``flaky_domains`` (default ``flaky.sandbox.example``): transient failure
- anything else: accepted, with a ``sandbox-<hex>`` message id

On top of that it can inject what real providers do: ``rate`` (its own limit per sender
process, past which it answers throttled), and ``failure_rate`` / ``throttle_rate`` /
``unknown_rate`` (random transient, throttled and unknown answers); ``latency_ms`` delays
each batch's answer like a round trip. ``keep_last`` keeps that many of the latest
messages (headers and bodies) in memory (``SandboxProvider.recent``) for tests and preview.

Accepted mail is recorded in Redis, shared across sender processes, so tests and the demo
can count deliveries and check the provider's rate limits were kept (keys hash-tagged by
provider name)::

    {prefix}:sandbox:{<name>}:count   total accepted
    {prefix}:sandbox:{<name>}:log     one "<unix_time_us>:<accepted>" per batch (last 100,000)
    {prefix}:sandbox:{<name>}:ids     accepted intent ids (last 1,000,000; record_ids)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sluice.common.errors import ConfigError, Unavailable
from sluice.common.providers import ProviderConfig, SandboxSettings
from sluice.sender.providers.base import OutboundEmail, Plan, ProviderResult, consecutive

LOG_LIMIT = 100_000
IDS_LIMIT = 1_000_000


def sandbox_key(prefix: str, provider: str, what: str) -> str:
    """The Redis key of one sandbox record (``count``, ``log`` or ``ids``)."""
    return f"{prefix}:sandbox:{{{provider}}}:{what}"


class SandboxProvider:
    """An ``EmailProvider`` that sends nothing and records what it accepted."""

    def __init__(self, config: ProviderConfig, redis: aioredis.Redis, prefix: str) -> None:
        settings = config.settings
        if not isinstance(settings, SandboxSettings):
            raise ConfigError(f"provider {config.name!r}: not a sandbox")
        self._name = config.name
        self._redis = redis
        self._settings = settings
        self._fail = frozenset(d.lower() for d in settings.fail_domains)
        self._flaky = frozenset(d.lower() for d in settings.flaky_domains)
        self._latency = settings.latency_ms / 1000
        self._rng = random.Random(settings.seed or None)
        self._tokens = max(1.0, settings.rate)
        self._refilled = time.monotonic()
        self._recent: deque[OutboundEmail] = deque(maxlen=settings.keep_last or 1)
        self._count_key = sandbox_key(prefix, config.name, "count")
        self._log_key = sandbox_key(prefix, config.name, "log")
        self._ids_key = sandbox_key(prefix, config.name, "ids")

    @property
    def name(self) -> str:
        """The configured provider name."""
        return self._name

    def recent(self) -> list[OutboundEmail]:
        """The latest ``keep_last`` messages handed to it, oldest first."""
        return list(self._recent) if self._settings.keep_last else []

    @property
    def largest_request(self) -> None:
        """Any number of messages in one call."""
        return None

    def plan(self, messages: Sequence[OutboundEmail]) -> Plan:
        """The whole batch is one call (one line of the send log)."""
        return consecutive(len(messages), max(1, len(messages)))

    async def send_batch(self, messages: Sequence[OutboundEmail]) -> list[ProviderResult]:
        """Answers every message and records the accepted ones.

        Raises ``Unavailable`` when the record cannot be written: for the sandbox the
        record is the delivery, so nothing unrecorded may be reported accepted.
        """
        sent_at_us = time.time_ns() // 1000  # when a real provider would see the request
        if self._settings.keep_last:
            self._recent.extend(messages)
        results = [self._answer(m) for m in messages]
        accepted = [r.intent_id for r in results if r.outcome == "accepted"]
        if accepted:
            await self._record(sent_at_us, accepted)
        if self._latency:
            await asyncio.sleep(self._latency)
        return results

    def _over_rate(self) -> bool:
        rate = self._settings.rate
        if rate <= 0:
            return False
        now = time.monotonic()
        self._tokens = min(max(1.0, rate), self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1:
            return True
        self._tokens -= 1
        return False

    def _answer(self, message: OutboundEmail) -> ProviderResult:
        s = self._settings
        if self._over_rate():
            return ProviderResult(
                message.intent_id,
                "throttled",
                reason="sandbox: rate exceeded",
                retry_after=1 / s.rate,
            )
        domain = message.recipient.rpartition("@")[2].lower()
        if domain in self._fail:
            return ProviderResult(message.intent_id, "permanent", reason="mailbox does not exist")
        if domain in self._flaky:
            return ProviderResult(
                message.intent_id, "transient", reason="sandbox: simulated temporary failure"
            )
        roll = self._rng.random() if s.failure_rate or s.throttle_rate or s.unknown_rate else 1.0
        if roll < s.failure_rate:
            return ProviderResult(message.intent_id, "transient", reason="sandbox: injected")
        roll -= s.failure_rate
        if roll < s.throttle_rate:
            return ProviderResult(
                message.intent_id,
                "throttled",
                reason="sandbox: injected",
                retry_after=s.throttle_retry_after,
            )
        roll -= s.throttle_rate
        if roll < s.unknown_rate:
            return ProviderResult(message.intent_id, "unknown", reason="sandbox: injected")
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
        if self._settings.record_ids:
            pipe.rpush(self._ids_key, *accepted)
            pipe.ltrim(self._ids_key, -IDS_LIMIT, -1)
        with _unavailable(f"sandbox provider {self._name!r}"):
            await pipe.execute()


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
