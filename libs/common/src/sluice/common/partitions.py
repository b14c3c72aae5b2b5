"""Monthly partitions of ``intents``: create the coming months', drop the expired ones.

The work is done by two SQL functions of migration 0005 (``sluice_create_intent_partitions``
and ``sluice_drop_intent_partitions``), so what ``sluice partitions`` does and what the
migration did are the same code. Run it from a scheduler (a Kubernetes CronJob, cron) at
least monthly; ahead-creation gives slack for missed runs, and an insert outside every
partition lands in the default partition instead of failing, to be moved out on the next
run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sluice.common.db import Executor

__all__ = ["PartitionChanges", "maintain_partitions"]


@dataclass(frozen=True, slots=True)
class PartitionChanges:
    """The partitions one maintenance run created and dropped, by name."""

    created: list[str]
    dropped: list[str]


async def maintain_partitions(
    pool: Executor,
    *,
    months_ahead: int,
    retain_months: int | None,
    at: datetime | None = None,
) -> PartitionChanges:
    """Create partitions up to ``months_ahead`` months after the current one (the month of
    ``at``, default now) and, when ``retain_months`` is given, drop partitions that ended
    more than that many months before it, with their idempotency keys."""
    if months_ahead < 0 or (retain_months is not None and retain_months < 1):
        raise ValueError("months_ahead must be >= 0 and retain_months >= 1")
    created = [
        r[0]
        for r in await pool.fetch(
            "SELECT sluice_create_intent_partitions($1, COALESCE($2::timestamptz, now()))",
            months_ahead,
            at,
        )
    ]
    dropped: list[str] = []
    if retain_months is not None:
        dropped = [
            r[0]
            for r in await pool.fetch(
                "SELECT sluice_drop_intent_partitions($1, COALESCE($2::timestamptz, now()))",
                retain_months,
                at,
            )
        ]
    return PartitionChanges(created=created, dropped=dropped)
