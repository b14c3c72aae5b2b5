"""What the dispatcher counts: one round's result and the running totals."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["DispatchStats", "RoundResult"]


@dataclass(frozen=True, slots=True)
class RoundResult:
    """What one round did.

    ``throttle_pause`` is the shortest retry-after the sender gave for throttled messages
    (seconds), or None when nothing was throttled. ``batches`` counts SendBatch calls and
    ``unreachable`` those that handed nothing over (sender or provider down).
    """

    leased: int = 0
    sent: int = 0
    throttled: int = 0
    retrying: int = 0
    failed: int = 0
    expired: int = 0
    written: int = 0
    throttle_pause: float | None = None
    batches: int = 0
    unreachable: int = 0
    waiting: int = 0
    unknown: int = 0


@dataclass
class DispatchStats:
    """Running totals of this dispatcher since it was built (for logs, tests, the demo)."""

    rounds: int = 0
    leased: int = 0
    sent: Counter[str] = field(default_factory=Counter)
    throttled: Counter[str] = field(default_factory=Counter)
    retrying: Counter[str] = field(default_factory=Counter)
    failed_by_provider: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    expired: int = 0
    batch_errors: int = 0
    results_dropped: int = 0
    released: int = 0
    reclaimed: int = 0
    round_errors: int = 0
    unknown: Counter[str] = field(default_factory=Counter)
    waiting: int = 0
    outage_released: int = 0
    lease_too_old: int = 0
