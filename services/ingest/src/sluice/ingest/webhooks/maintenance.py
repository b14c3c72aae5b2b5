"""The webhook endpoint's periodic work: guards, late events, raw-payload retention.

One loop per ingest process, every ``guard_check_seconds``. Each step is idempotent, so any
number of ingest replicas may run it at once.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from sluice.common.errors import Unavailable
from sluice.ingest.webhooks import guards
from sluice.ingest.webhooks.config import WebhookConfig
from sluice.ingest.webhooks.metrics import WebhookMetrics
from sluice.ingest.webhooks.repository import CURRENT_RANK_SQL, SETTLEABLE_SQL

log = logging.getLogger("sluice.ingest.webhooks")

# Events that arrived while their intent was still leased (the webhook beat the router's
# write-back) are applied once the intent is 'sent'. Looks back one hour; an event older
# than that whose intent never left 'leased' is left as history.
REAPPLY_SQL = f"""
WITH cand AS (
    SELECT DISTINCT ON (e.intent_id)
           e.intent_id, e.id, e.received_at, e.event_type,
           CASE e.event_type WHEN 'delivered' THEN 1 WHEN 'bounced' THEN 2 ELSE 3 END AS rank
    FROM delivery_events e
    WHERE NOT e.applied AND e.intent_id IS NOT NULL
      AND e.event_type IN ('delivered', 'bounced', 'complained')
      AND e.received_at > now() - interval '1 hour'
    ORDER BY e.intent_id, rank DESC, e.id
), moved AS (
    UPDATE intents i
    SET status = c.event_type::intent_status, updated_at = now()
    FROM cand c
    WHERE i.id = c.intent_id
      AND {SETTLEABLE_SQL} AND {CURRENT_RANK_SQL} < c.rank
    RETURNING c.id, c.received_at
)
UPDATE delivery_events d SET applied = true
FROM moved WHERE d.id = moved.id AND d.received_at = moved.received_at
"""

RETENTION_SQL = """
UPDATE delivery_events SET raw = NULL
WHERE id = ANY(ARRAY(
    SELECT id FROM delivery_events
    WHERE received_at < now() - make_interval(secs => $1) AND raw IS NOT NULL
    LIMIT 5000
))
"""


async def run_once(pool: asyncpg.Pool, config: WebhookConfig, metrics: WebhookMetrics) -> None:
    """One round of every step."""
    for state in await guards.evaluate(pool, config):
        metrics.guard_tripped.labels(state.provider, state.guard).set(int(state.tripped))
        metrics.guard_rate.labels(state.provider, state.guard).set(state.rate)
    await pool.execute(REAPPLY_SQL)
    await pool.execute(RETENTION_SQL, config.raw_retention_days * 86_400)


async def run(pool: asyncpg.Pool, config: WebhookConfig, metrics: WebhookMetrics) -> None:
    """Runs :func:`run_once` forever; a failed round is logged and retried next period."""
    while True:
        try:
            await run_once(pool, config, metrics)
        except (Unavailable, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("webhook maintenance round failed: %s", exc)
        await asyncio.sleep(config.guard_check_seconds)
