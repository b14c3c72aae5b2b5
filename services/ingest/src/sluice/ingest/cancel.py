"""Cancelling intents: one, or every pending intent of a campaign, in one statement each.

Only ``pending`` intents (due now, scheduled for later, or waiting for a retry) are
cancelled. A ``leased`` intent is being sent by a router right now; it finishes, because
stopping it half-way could not stop a provider that already has the message. Each
statement is atomic against the router's lease: the lease takes rows with ``FOR UPDATE
SKIP LOCKED`` and the cancel re-checks ``status = 'pending'`` on the newest row version, so
an intent is either leased or cancelled, never both.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from sluice.common.db import Executor, db_boundary
from sluice.common.errors import FailedPrecondition, NotFound
from sluice.ingest import repository
from sluice.ingest.repository import IntentRow

CANCEL_INTENT_SQL = """
UPDATE intents SET status = 'cancelled', updated_at = now()
WHERE id = $1 AND status = 'pending'
RETURNING id
"""

CANCEL_CAMPAIGN_SQL = """
WITH cancelled AS (
    UPDATE intents SET status = 'cancelled', updated_at = now()
    WHERE campaign_id = $1 AND status = 'pending'
    RETURNING 1
)
SELECT (SELECT count(*) FROM cancelled) AS cancelled,
       (SELECT count(*) FROM intents WHERE campaign_id = $1 AND status = 'leased') AS leased
"""


@dataclass(frozen=True, slots=True)
class CampaignCancellation:
    """What CancelCampaign did: intents cancelled, and intents still being sent."""

    cancelled: int
    leased: int


@db_boundary
async def cancel_intent(pool: Executor, intent_id: UUID) -> tuple[IntentRow, bool]:
    """Cancel one pending intent; returns it as stored and whether this call cancelled it.

    Raises NotFound for an unknown id and FailedPrecondition for an intent that is being
    sent or has finished. Cancelling a cancelled intent changes nothing (a retry is safe).
    """
    changed = await pool.fetchval(CANCEL_INTENT_SQL, intent_id)
    row = await repository.get_intent(pool, intent_id)
    if row is None:
        raise NotFound(f"intent {intent_id} does not exist")
    if changed is not None:
        return row, True
    if row.status == "cancelled":
        return row, False
    why = "it is being sent" if row.status == "leased" else f"it is already {row.status}"
    raise FailedPrecondition(
        f"intent {intent_id} cannot be cancelled: {why}",
        metadata={"intent_id": str(intent_id), "status": row.status},
    )


@db_boundary
async def cancel_campaign(pool: Executor, campaign_id: str) -> CampaignCancellation:
    """Cancel every pending intent of ``campaign_id`` in one statement."""
    rec = await pool.fetchrow(CANCEL_CAMPAIGN_SQL, campaign_id)
    assert rec is not None
    return CampaignCancellation(cancelled=int(rec["cancelled"]), leased=int(rec["leased"]))
