-- Leasing and completing an intent cost half what they did: fewer index entries per lease,
-- and no empty partitions to probe.
--
-- 1. The three ListIntents indexes leave leased rows out.
--
--    A status update is never HOT (status is in the partial indexes' predicates), so every
--    row version gets an entry in every index whose predicate it meets. The router writes
--    two versions per intent, leased and then sent, and the list indexes took an entry for
--    both, plus a SHA-256 of the recipient for the expression index. Measured with the bare
--    lease -> complete pipeline (`python -m bench`, baseline row) on 2 cores, these three
--    indexes were half of PostgreSQL's CPU per intent (77 -> 38 µs with all three gone).
--    A leased row lives for one round (under a second), and the router's leased-expiry
--    index already finds every leased row; listings read those from there
--    (sluice.ingest.listing), so a listing still shows every intent.
--
-- 2. Monthly partitions before the current month that hold no row are dropped.
--
--    0005 created partitions back to the oldest row, at most a year, but an empty table has
--    no oldest row and greatest(NULL, x) is x: a new installation got twelve empty past
--    months. Every lookup by id (the router's write-back of each batch) probed all of them.
--    Future months and any partition holding rows stay; `sluice partitions` only ever
--    creates the current and coming months, so they do not come back.

DROP INDEX intents_created_idx;
CREATE INDEX intents_created_idx ON intents (created_at DESC, id DESC)
    WHERE status <> 'leased';

DROP INDEX intents_campaign_created_idx;
CREATE INDEX intents_campaign_created_idx ON intents (campaign_id, created_at DESC, id DESC)
    WHERE status <> 'leased';

DROP INDEX intents_recipient_created_idx;
CREATE INDEX intents_recipient_created_idx
    ON intents (sluice_recipient_hash(recipient), created_at DESC, id DESC)
    WHERE status <> 'leased';

DO $$
DECLARE
    part record;
    this_month text := sluice_intent_partition_name(now());
    empty boolean;
BEGIN
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'intents'::regclass AND c.relname ~ '^intents_p[0-9]{6}$'
          AND c.relname < this_month
        ORDER BY c.relname
    LOOP
        EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM %I)', part.relname) INTO empty;
        IF empty THEN
            EXECUTE format('ALTER TABLE intents DETACH PARTITION %I', part.relname);
            EXECUTE format('DROP TABLE %I', part.relname);
        END IF;
    END LOOP;
END
$$;
