"""How each message's outcome becomes its intent's next state. Pure logic, no I/O.

=====================  ==========================================================  =======
outcome                next state                                                  attempt
=====================  ==========================================================  =======
accepted               ``sent``                                                    yes
throttled              ``pending`` at the retry-after, paced at the provider's     no
                       rate
provider unavailable   ``pending``, held for the unreachable target (released as   no
                       soon as a probe reaches it again)
transient failure      ``pending`` after full-jitter backoff, ``failed`` with the  yes
                       last error once attempts are exhausted
permanent failure      ``failed`` at once (a hard bounce also suppresses the       yes
                       address)
unknown                ``retry``: like a transient failure (the provider may send  yes
                       it twice unless it takes an idempotency key); ``hold``:
                       ``pending`` held for reconciliation by delivery events,
                       retried only after the hold
=====================  ==========================================================  =======

An unknown outcome spends an attempt under both policies, so a batch that kills the sender
every time ends ``failed`` after ``max_attempts`` instead of being retried forever.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sluice.router.repository import Completion, LeasedIntent
from sluice.router.sender_client import BatchOutcome, MessageOutcome
from sluice.v1 import sender_pb2

__all__ = [
    "RECONCILE",
    "SENDER_TARGET",
    "RetryPolicy",
    "is_hard_bounce",
    "resolve_batch",
    "resolve_message",
]

# held_for of an intent waiting for the sender service itself (provider names are the others)
SENDER_TARGET = "<sender>"
# held_for of an intent whose outcome was unknown, under the ``hold`` policy
RECONCILE = "reconcile"
# the kind whose throttled intents are not paced (see resolve_message)
URGENT_KIND = "transactional"

# Without a retry-after from the sender, a throttled intent still waits this long, so a
# sender bug cannot make the router spin on the same rows.
MIN_THROTTLE_DELAY_SECONDS = 0.1
_MAX_EXPONENT = 64  # 2**64 * any sane base is far above any retry_max: no float overflow

# Permanent failures that say the address itself is dead (SMTP 5.1.x, providers' wording),
# as opposed to content rejected or a policy block, which do not suppress the address.
_HARD_BOUNCE = re.compile(
    r"\b5\.1\.\d\b|mailbox (does not exist|unavailable|not found)|user unknown|no such user"
    r"|unknown user|invalid recipient|recipient (address )?rejected|address does not exist"
    r"|hard[ _-]?bounce",
    re.IGNORECASE,
)


def is_hard_bounce(reason: str) -> bool:
    """Whether a permanent failure's reason says the recipient address does not exist."""
    return bool(_HARD_BOUNCE.search(reason))


class _Settings(Protocol):
    @property
    def max_attempts(self) -> int: ...
    @property
    def retry_base_seconds(self) -> float: ...
    @property
    def retry_max_seconds(self) -> float: ...
    @property
    def unknown_outcome_policy(self) -> str: ...
    @property
    def unknown_hold_seconds(self) -> float: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a failed intent is tried again, and when it stops being tried.

    ``max_attempts`` counts attempts that may have reached a provider (throttling and
    unreachable targets are not attempts). ``throttle_jitter`` spreads throttled retries
    over ``retry_after * (1 + U(0, jitter))`` so a throttled lease does not come back as one
    thundering herd.
    """

    max_attempts: int = 5
    base_seconds: float = 2.0
    max_seconds: float = 600.0
    throttle_jitter: float = 0.1
    unknown: str = "retry"
    unknown_hold_seconds: float = 900.0

    @classmethod
    def from_settings(cls, settings: _Settings) -> RetryPolicy:
        """The policy the settings describe."""
        return cls(
            max_attempts=settings.max_attempts,
            base_seconds=settings.retry_base_seconds,
            max_seconds=settings.retry_max_seconds,
            unknown=settings.unknown_outcome_policy,
            unknown_hold_seconds=settings.unknown_hold_seconds,
        )

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter delay before retry number ``attempt`` (0 for the first retry):
        ``U(0, min(max_seconds, base_seconds * 2**attempt))``."""
        exponent = min(max(attempt, 0), _MAX_EXPONENT)
        ceiling = min(self.max_seconds, self.base_seconds * float(2**exponent))
        return rng.uniform(0.0, max(ceiling, 0.0))

    def throttle_delay(self, retry_after: float, rng: random.Random) -> float:
        """Delay for a throttled intent: the sender's retry-after plus 0-10 % jitter."""
        base = max(retry_after, MIN_THROTTLE_DELAY_SECONDS)
        return base * (1.0 + rng.uniform(0.0, self.throttle_jitter))


@dataclass(frozen=True, slots=True)
class Timing:
    """What a resolution needs from the provider state: when a throttled intent for a
    provider may come back (``throttle_due(provider, earliest)``) and how long an intent
    waits for an unreachable target (``hold_seconds(target)``)."""

    throttle_due: Callable[[str, datetime], datetime]
    hold_seconds: Callable[[str], float]


def _attempt_failed(
    intent: LeasedIntent,
    provider: str,
    outcome: int,
    reason: str,
    *,
    retry_after: float,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    hold: bool = False,
) -> Completion:
    if intent.attempts + 1 >= policy.max_attempts:
        return Completion(
            intent_id=intent.id,
            status="failed",
            provider=provider,
            attempted=True,
            last_error=f"attempts exhausted ({intent.attempts + 1}): {reason}",
            outcome=outcome,
        )
    if hold:
        delay, held_for = policy.unknown_hold_seconds, RECONCILE
    else:
        delay, held_for = max(policy.backoff(intent.attempts, rng), retry_after), None
    return Completion(
        intent_id=intent.id,
        status="pending",
        provider=provider,
        due_at=now + timedelta(seconds=delay),
        attempted=True,
        last_error=reason,
        outcome=outcome,
        held_for=held_for,
    )


def resolve_message(
    intent: LeasedIntent,
    provider: str,
    message: MessageOutcome,
    *,
    sender_reached: bool = True,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    timing: Timing,
) -> Completion:
    """The next state of ``intent`` after ``message`` (see the module's table)."""
    outcome = message.outcome
    if outcome == sender_pb2.SEND_OUTCOME_ACCEPTED:
        return Completion(
            intent_id=intent.id,
            status="sent",
            provider=provider,
            provider_message_id=message.provider_message_id or None,
            attempted=True,
            outcome=outcome,
        )
    if outcome == sender_pb2.SEND_OUTCOME_THROTTLED:
        earliest = now + timedelta(seconds=policy.throttle_delay(message.retry_after, rng))
        return Completion(
            intent_id=intent.id,
            status="pending",
            provider=provider,
            # Transactional intents are few and urgent: they come back at the retry-after,
            # never queued behind a marketing backlog's slots.
            due_at=earliest
            if intent.kind == URGENT_KIND
            else timing.throttle_due(provider, earliest),
            attempted=False,
            outcome=outcome,
        )
    if outcome == sender_pb2.SEND_OUTCOME_PROVIDER_UNAVAILABLE:
        target = provider if sender_reached else SENDER_TARGET
        reason = message.reason or "unreachable"
        return Completion(
            intent_id=intent.id,
            status="pending",
            provider=provider,
            due_at=now + timedelta(seconds=timing.hold_seconds(target)),
            attempted=False,
            last_error=reason if not sender_reached else f"provider unavailable: {reason}",
            outcome=outcome,
            held_for=target,
        )
    if outcome == sender_pb2.SEND_OUTCOME_PERMANENT_FAILURE:
        return Completion(
            intent_id=intent.id,
            status="failed",
            provider=provider,
            attempted=True,
            last_error=message.reason or "permanent failure",
            outcome=outcome,
        )
    if outcome == sender_pb2.SEND_OUTCOME_UNKNOWN:
        return _attempt_failed(
            intent,
            provider,
            outcome,
            f"outcome unknown: {message.reason or 'no answer'}",
            retry_after=0.0,
            now=now,
            policy=policy,
            rng=rng,
            hold=policy.unknown == "hold",
        )
    return _attempt_failed(
        intent,
        provider,
        sender_pb2.SEND_OUTCOME_TRANSIENT_FAILURE,
        message.reason or "transient failure",
        retry_after=message.retry_after,
        now=now,
        policy=policy,
        rng=rng,
    )


def resolve_batch(
    intents: tuple[LeasedIntent, ...],
    batch: BatchOutcome,
    *,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    timing: Timing,
) -> list[Completion]:
    """One completion per intent, in ``intents`` order, matched to outcomes by intent id."""
    missing = MessageOutcome(sender_pb2.SEND_OUTCOME_UNKNOWN, reason="no outcome for message")
    return [
        resolve_message(
            i,
            batch.provider,
            batch.messages.get(str(i.id), missing),
            sender_reached=batch.sender_reached,
            now=now,
            policy=policy,
            rng=rng,
            timing=timing,
        )
        for i in intents
    ]
