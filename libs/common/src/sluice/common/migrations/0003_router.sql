-- 0003_router: what the router records about its decisions, and the operators' controls
-- every router replica reads.

-- The routing decision of the last attempt (which provider is in `provider`): why that
-- provider, and what the message costs there (US dollars). `held_for` names what a pending
-- intent waits for instead of its own backoff: an unreachable target (`<sender>` or a
-- provider name, released as soon as a probe reaches it again) or `reconcile` (an outcome
-- that was unknown, waiting for a delivery event).
ALTER TABLE intents
    ADD COLUMN route_reason text,
    ADD COLUMN route_cost double precision,
    ADD COLUMN held_for text,
    -- set by RetryFailed with a provider: the router sends through it, whatever it costs
    ADD COLUMN forced_provider text;

-- Releasing the intents held for a target that answers again reads only the held ones; the
-- index is partial, so it holds only rows held right now.
CREATE INDEX intents_held_for_idx ON intents (held_for) WHERE held_for IS NOT NULL;

-- Fair share per campaign: the lease picks, per (priority, campaign), the oldest due rows.
CREATE INDEX intents_pending_campaign_due_idx ON intents (priority, campaign_id, due_at)
    WHERE status = 'pending';

-- A provider an operator paused (manual failover), for every intent kind (`kind` NULL) or
-- for one kind. Every router reads this table, so one PauseProvider call moves traffic on
-- every replica.
CREATE TABLE provider_pauses (
    provider   text NOT NULL,
    -- '' for every kind, else an intent kind
    kind       text NOT NULL DEFAULT '',
    reason     text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, kind)
);

-- RetryFailed is idempotent per request_id: the first call's answer is kept and given back.
CREATE TABLE retry_requests (
    request_id text PRIMARY KEY,
    requeued   bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
