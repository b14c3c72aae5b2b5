-- 0006_events: provider delivery events, suppression from them, and provider guards.
--
-- Written by ingest's webhook endpoint (sluice.ingest.webhooks.repository): a whole webhook
-- request (up to hundreds of SendGrid events) is stored and applied in one transaction with
-- a constant number of statements.

-- The suppression list is created by 0005 (ingest catalogue) with exactly this shape; this
-- statement only matters on a branch without 0005 and is a no-op after it.
CREATE TABLE IF NOT EXISTS suppressions (
    address    text PRIMARY KEY,  -- normalised, lower-cased domain, as ingest stores recipients
    reason     text NOT NULL CHECK (reason IN ('hard_bounce', 'complaint', 'manual', 'unsubscribe', 'soft_bounce')),
    provider   text,
    intent_id  uuid,
    note       text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Idempotency keys of events: (source, provider event id) is SendGrid's sg_event_id, the SNS
-- MessageId, or the svix-id. Kept in its own narrow table so that delivery_events can be
-- partitioned by received_at later: a unique index on a partitioned table must contain the
-- partition key, and "unique per provider, whenever received" is the promise. Rows here are
-- ~60 bytes; a retention job may delete keys older than any provider's redelivery horizon
-- (SendGrid retries for 72 hours).
CREATE TABLE delivery_event_keys (
    source      text NOT NULL,
    event_id    text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, event_id)
);

CREATE TABLE delivery_events (
    -- The watch cursor. Ids are taken under a transaction-level advisory lock held to commit
    -- (see repository.py), so they become visible in id order and a watcher reading
    -- "id > cursor" never skips one that commits late.
    id                  bigint GENERATED ALWAYS AS IDENTITY,
    source              text NOT NULL,          -- ses | resend | sendgrid | unsubscribe
    event_id            text NOT NULL,
    -- the provider the intent went through (intents.provider), else the source
    provider            text NOT NULL,
    intent_id           uuid,                   -- NULL when no intent matched
    campaign_id         text,                   -- copied from the intent, for watch filters
    kind                intent_kind,
    provider_message_id text,
    recipient           text,
    event_type          text NOT NULL CHECK (event_type IN (
        'delivered', 'bounced', 'complained', 'opened', 'clicked', 'deferred', 'dropped',
        'unsubscribed')),
    bounce_type         text CHECK (bounce_type IN ('hard', 'soft')),
    -- did this event move its intent's status (false: duplicate-free but late or inert)
    applied             boolean NOT NULL DEFAULT false,
    detail              text NOT NULL DEFAULT '',
    occurred_at         timestamptz NOT NULL,
    received_at         timestamptz NOT NULL DEFAULT now(),
    -- the provider's payload, set to NULL once older than SLUICE_EVENT_RAW_RETENTION_DAYS
    raw                 jsonb,
    -- includes the future partition key already
    PRIMARY KEY (id, received_at)
);

-- GetIntent's history.
CREATE INDEX delivery_events_intent_idx ON delivery_events (intent_id, occurred_at)
    WHERE intent_id IS NOT NULL;
-- Raw-payload retention.
CREATE INDEX delivery_events_received_idx ON delivery_events (received_at);
-- The re-apply sweep: an event that arrived while its intent was still leased (the webhook
-- beat the router's write-back) is applied once the intent is 'sent'. Partial: only
-- state-changing events that have not moved their intent.
CREATE INDEX delivery_events_unapplied_idx ON delivery_events (received_at)
    WHERE NOT applied AND intent_id IS NOT NULL
      AND event_type IN ('delivered', 'bounced', 'complained');
-- Soft bounces per address within a window; partial, so it holds only soft bounces.
CREATE INDEX delivery_events_soft_bounce_idx ON delivery_events (recipient, occurred_at)
    WHERE bounce_type = 'soft';

-- Matching events that carry no intent tag by the id the provider gave the message. Only
-- sent rows have one; the index costs one entry per completed send (those updates are not
-- HOT anyway, see 0001).
CREATE INDEX intents_provider_message_idx ON intents (provider_message_id)
    WHERE provider_message_id IS NOT NULL;
-- Pending intents of a newly suppressed address become 'suppressed'. Partial on pending, so
-- it holds only the live queue.
CREATE INDEX intents_pending_recipient_idx ON intents (recipient) WHERE status = 'pending';

-- Outcome counts per provider and minute, kept up to date by every event batch, so a guard
-- evaluates a 24-hour window from at most 1,440 rows per provider instead of counting events.
CREATE TABLE provider_event_counts (
    provider     text NOT NULL,
    minute       timestamptz NOT NULL,
    delivered    bigint NOT NULL DEFAULT 0,
    hard_bounced bigint NOT NULL DEFAULT 0,
    soft_bounced bigint NOT NULL DEFAULT 0,
    complained   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (provider, minute)
);

-- Deliverability guards, written by ingest from the events, read by the router:
--   SELECT provider, blocked_kinds FROM provider_guards WHERE tripped
-- A tripped guard means: do not route the listed kinds to that provider (transactional mail
-- is never listed). One row per (provider, guard), updated in place.
CREATE TABLE provider_guards (
    provider       text NOT NULL,
    guard          text NOT NULL CHECK (guard IN ('complaint_rate', 'bounce_rate')),
    tripped        boolean NOT NULL DEFAULT false,
    rate           double precision NOT NULL DEFAULT 0,
    threshold      double precision NOT NULL,
    events         bigint NOT NULL DEFAULT 0,  -- complaints or bounces in the window
    volume         bigint NOT NULL DEFAULT 0,  -- outcomes (delivered + bounced) in the window
    window_seconds double precision NOT NULL,
    blocked_kinds  intent_kind[] NOT NULL DEFAULT '{marketing,digest}',
    tripped_at     timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, guard)
);
