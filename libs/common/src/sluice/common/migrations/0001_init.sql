-- 0001_init: templates and intents, the durable core of Sluice.
--
-- Applied by sluice.common.db.migrate() inside one transaction, under an advisory lock.
--
-- Write pattern this schema is shaped for (see DESIGN "What this machine can do"): an intent
-- row is inserted once, then updated 2-4 times (lease, complete, maybe retries, then the
-- delivery webhook). None of those updates can be HOT: `status` appears in the predicate of
-- the two partial queue indexes, and PostgreSQL treats a column used in any index predicate
-- like an indexed column. A non-HOT update adds an entry for the new row version to EVERY
-- index of the table, so:
--   * the table carries only the indexes the read paths need (no index on status,
--     updated_at, lease_id, attempts or provider);
--   * the two indexes on changing columns are partial: they hold only the live queue
--     (pending / leased rows), never the growing history, so they stay small and cached.
-- Measured on 300k pending rows (2 cores, noisy): lease 500 + complete 500 ran at
-- ~12-14k intents/s end to end (Python client on the same box); HOT updates: 0%.
-- Dropping the two created_at indexes changed that by less than the noise, and fillfactor
-- 70/85/100 made no measurable difference (with no HOT updates, spare page room buys
-- nothing), so the table keeps the default. The way to make status changes HOT would be a
-- narrow side table holding the queue state (priority, due_at, lease); on these numbers it
-- is not worth a second row per intent yet.

CREATE TYPE intent_kind AS ENUM ('transactional', 'marketing', 'digest');

CREATE TYPE intent_status AS ENUM (
    'pending',     -- waiting for due_at; a router may lease it
    'leased',      -- a router holds it until lease_expires_at
    'sent',        -- a provider accepted it (NOT delivered: that comes from a webhook)
    'delivered',
    'bounced',
    'complained',
    'failed',      -- permanent failure or attempts exhausted
    'cancelled',
    'suppressed',
    'expired'      -- deadline passed before it could be sent
);

CREATE TABLE templates (
    id           text PRIMARY KEY,
    -- bumped by every upsert that changes content, so a rendered message can name the
    -- exact template version it came from
    version      integer NOT NULL DEFAULT 1,
    subject      text NOT NULL,
    html_body    text NOT NULL,
    text_body    text NOT NULL DEFAULT '',
    -- the variable names the template uses; ingest rejects intents that do not supply them
    variables    text[] NOT NULL DEFAULT '{}',
    from_address text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE intents (
    id                  uuid PRIMARY KEY,
    -- Globally unique. When intents is partitioned by month (roadmap), this constraint cannot
    -- stay here: a unique index on a partitioned table must include the partition key, and
    -- (idempotency_key, created_at) is not the promise we make. The uniqueness then moves to a
    -- narrow side table intent_keys(idempotency_key text PRIMARY KEY, intent_id uuid,
    -- payload_hash bytea) written in the same statement as the intent.
    idempotency_key     text NOT NULL UNIQUE,
    -- hash of the canonical request, to tell a retry (same hash) from key reuse (different)
    payload_hash        bytea NOT NULL,
    campaign_id         text NOT NULL DEFAULT '',
    recipient           text NOT NULL,
    kind                intent_kind NOT NULL,
    -- 0 transactional, 1 digest, 2 marketing: lower leases first
    priority            smallint NOT NULL CHECK (priority >= 0),
    template_id         text NOT NULL REFERENCES templates (id),
    variables           jsonb NOT NULL DEFAULT '{}',
    send_at             timestamptz NOT NULL,
    deadline            timestamptz NOT NULL,
    -- next time a router may lease it: send_at, then retry times
    due_at              timestamptz NOT NULL,
    status              intent_status NOT NULL DEFAULT 'pending',
    provider            text,
    provider_message_id text,
    attempts            integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error          text,
    -- the lease that last took the row; a result is written only if it still matches, so a
    -- router whose lease expired and was re-leased elsewhere can never overwrite the new one
    lease_id            uuid,
    lease_expires_at    timestamptz,
    traceparent         text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT intents_deadline_after_send_at CHECK (deadline >= send_at),
    -- a leased row always says whose lease it is and when it runs out, or reclaim misses it
    CONSTRAINT intents_leased_has_lease CHECK (
        status <> 'leased' OR (lease_id IS NOT NULL AND lease_expires_at IS NOT NULL)
    )
);

-- The lease query: WHERE status = 'pending' AND due_at <= now() ORDER BY priority, due_at.
-- Partial, so it holds only the live queue and not the history of sent rows; its order is the
-- lease order, so a lease reads the first N entries and stops.
CREATE INDEX intents_pending_due_idx ON intents (priority, due_at) WHERE status = 'pending';

-- reclaim_expired(): leased rows whose lease ran out. Partial for the same reason; it holds
-- only rows in flight.
CREATE INDEX intents_leased_expiry_idx ON intents (lease_expires_at) WHERE status = 'leased';

-- ListIntents for one campaign, newest first, keyset-paginated on (created_at, id).
CREATE INDEX intents_campaign_created_idx ON intents (campaign_id, created_at DESC, id DESC);

-- ListIntents over everything, newest first, same keyset.
CREATE INDEX intents_created_idx ON intents (created_at DESC, id DESC);
