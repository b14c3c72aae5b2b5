-- 0005_catalogue: immutable template versions, the suppression list, and lookup of intents
-- by recipient.

-- Every version a template ever had. `templates` stays the latest version of each template
-- (ingest validates and the router sends from it, unchanged); this table keeps the history,
-- written by a trigger so that every writer of `templates` (TemplateService, the demo seed,
-- a hand-run upsert) records its versions the same way.
CREATE TABLE template_versions (
    -- deleting a template (only possible once no intent names it) takes its history along
    template_id  text NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    version      integer NOT NULL CHECK (version >= 1),
    subject      text NOT NULL,
    html_body    text NOT NULL,
    text_body    text NOT NULL,
    variables    text[] NOT NULL,
    from_address text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (template_id, version)
);

INSERT INTO template_versions
    (template_id, version, subject, html_body, text_body, variables, from_address, created_at)
SELECT id, version, subject, html_body, text_body, variables, from_address, updated_at
FROM templates;

CREATE FUNCTION templates_record_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO template_versions
        (template_id, version, subject, html_body, text_body, variables, from_address)
    VALUES (NEW.id, NEW.version, NEW.subject, NEW.html_body, NEW.text_body, NEW.variables,
            NEW.from_address)
    ON CONFLICT (template_id, version) DO NOTHING;
    -- The same version number with other content would make "version N" mean two things.
    IF NOT FOUND AND EXISTS (
        SELECT 1 FROM template_versions v
        WHERE v.template_id = NEW.id AND v.version = NEW.version
          AND (v.subject, v.html_body, v.text_body, v.variables, v.from_address)
              IS DISTINCT FROM
              (NEW.subject, NEW.html_body, NEW.text_body, NEW.variables, NEW.from_address)
    ) THEN
        RAISE EXCEPTION 'template % version % exists with other content', NEW.id, NEW.version
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER templates_record_version
    AFTER INSERT OR UPDATE ON templates
    FOR EACH ROW EXECUTE FUNCTION templates_record_version();

CREATE FUNCTION template_versions_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'template versions are immutable' USING ERRCODE = 'read_only_sql_transaction';
END
$$;

CREATE TRIGGER template_versions_immutable
    BEFORE UPDATE ON template_versions
    FOR EACH ROW EXECUTE FUNCTION template_versions_immutable();

-- The suppression list. Addresses are stored normalised exactly as ingest stores
-- recipients, so `address = intents.recipient` is the whole test.
CREATE TABLE suppressions (
    address    text PRIMARY KEY,
    reason     text NOT NULL CHECK (
        reason IN ('hard_bounce', 'complaint', 'manual', 'unsubscribe', 'soft_bounce')
    ),
    provider   text,
    intent_id  uuid,
    note       text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);

-- ListSuppressions, newest first, keyset-paginated on (created_at, address).
CREATE INDEX suppressions_created_idx ON suppressions (created_at DESC, address DESC);

-- Lookup by recipient without the address in clear as a query parameter (where slow-query
-- logs and pg_stat_statements would keep it): ingest computes the same digest in Python
-- (sluice.ingest.listing.recipient_hash) and queries on it. The prefix keys the digest to
-- Sluice so a generic table of address hashes does not apply; it is not a secret, the
-- table holds the address anyway. 16 bytes: collisions are out of reach (birthday bound
-- 2^64) and the index stays half the size of a full SHA-256.
-- convert_to() is STABLE only because it depends on the database encoding, which is fixed
-- for the life of a database, so IMMUTABLE here is true.
CREATE FUNCTION sluice_recipient_hash(address text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN substring(sha256(convert_to('sluice-recipient-v1:' || address, 'UTF8')) FROM 1 FOR 16);

-- ListIntents for one recipient, newest first, same keyset as the other list indexes.
-- recipient never changes after insert, but status updates are not HOT (see 0001), so this
-- index takes an entry per row version like the other two list indexes.
CREATE INDEX intents_recipient_created_idx
    ON intents (sluice_recipient_hash(recipient), created_at DESC, id DESC);

-- ---------------------------------------------------------------------------------------
-- Intents partitioned by month of created_at, with idempotency kept global.
--
-- A unique index on a partitioned table must contain the partition key, so
-- UNIQUE (idempotency_key) cannot stay on intents: (idempotency_key, created_at) would let
-- a retry in another month create a second intent. The promise moves to intent_keys, a
-- narrow unpartitioned table written in the same statement as the intent (see
-- sluice.ingest.repository.INSERT_INTENTS_SQL). Its created_at is the intent's (both are
-- the inserting transaction's now()), which names the partition the intent lives in and
-- lets retention drop a month's keys with its partition.
--
-- The conversion copies rows into the new table in this migration's transaction: on a big
-- installation run `sluice migrate` at a quiet time (the copy is one pass over the table;
-- writes wait for it). It is written against whatever columns, CHECK constraints, indexes
-- and foreign keys earlier migrations left on intents, so it keeps all of them.
CREATE TABLE intent_keys (
    idempotency_key text PRIMARY KEY,
    intent_id       uuid NOT NULL,
    payload_hash    bytea NOT NULL,
    created_at      timestamptz NOT NULL
);
-- retention: the keys of a dropped month go with it
CREATE INDEX intent_keys_created_idx ON intent_keys (created_at);

INSERT INTO intent_keys (idempotency_key, intent_id, payload_hash, created_at)
SELECT idempotency_key, id, payload_hash, created_at FROM intents;

-- The name of the monthly partition holding `at`.
CREATE FUNCTION sluice_intent_partition_name(at timestamptz) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN 'intents_p' || to_char(at AT TIME ZONE 'UTC', 'YYYYMM');

-- Creates the monthly partitions from the month of `from_at` to `months_ahead` months after
-- the month of `at`, where missing; returns the names created. Rows that landed in the
-- default partition for a month (nobody ran `sluice partitions` in time) move into it. The
-- new table is created on its own and then attached, which locks the parent only in SHARE
-- UPDATE EXCLUSIVE mode: inserts and the router's lease keep running.
CREATE FUNCTION sluice_create_intent_partitions(
    months_ahead integer, at timestamptz DEFAULT now(), from_at timestamptz DEFAULT NULL
) RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    m_start timestamptz := date_trunc('month', COALESCE(from_at, at) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    last_start timestamptz := (date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
                         + make_interval(months => months_ahead);
    name  text;
BEGIN
    WHILE m_start <= last_start LOOP
        name := sluice_intent_partition_name(m_start);
        IF to_regclass(name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I (LIKE intents INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
                'INCLUDING GENERATED INCLUDING STORAGE)', name);
            IF to_regclass('intents_default') IS NOT NULL THEN
                EXECUTE format(
                    'WITH moved AS (DELETE FROM intents_default WHERE created_at >= %L '
                    'AND created_at < %L RETURNING *) INSERT INTO %I SELECT * FROM moved',
                    m_start, m_start + interval '1 month', name);
            END IF;
            EXECUTE format('ALTER TABLE intents ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           name, m_start, m_start + interval '1 month');
            RETURN NEXT name;
        END IF;
        m_start := m_start + interval '1 month';
    END LOOP;
END
$$;

-- Drops the monthly partitions that ended more than `retain_months` months before the
-- month of `at`, with their idempotency keys; returns the names dropped. A key outlives its
-- intent by nothing: after retention the same key makes a new intent.
CREATE FUNCTION sluice_drop_intent_partitions(
    retain_months integer, at timestamptz DEFAULT now()
) RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    keep_from timestamptz := (date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
                             - make_interval(months => retain_months);
    part record;
    m_start timestamptz;
BEGIN
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'intents'::regclass AND c.relname ~ '^intents_p[0-9]{6}$'
        ORDER BY c.relname
    LOOP
        m_start := (substr(part.relname, 10, 4) || '-' || substr(part.relname, 14, 2) || '-01 00:00:00+00')::timestamptz;
        IF m_start + interval '1 month' <= keep_from THEN
            EXECUTE format('ALTER TABLE intents DETACH PARTITION %I', part.relname);
            DELETE FROM intent_keys
            WHERE created_at >= m_start AND created_at < m_start + interval '1 month';
            EXECUTE format('DROP TABLE %I', part.relname);
            RETURN NEXT part.relname;
        END IF;
    END LOOP;
END
$$;

DO $$
DECLARE
    idx record;
    fk record;
    indexes text[] := '{}';
    fks text[] := '{}';
    statement text;
    oldest timestamptz;
BEGIN
    -- what earlier migrations put on intents, to put back on the partitioned table
    FOR idx IN
        SELECT pg_get_indexdef(i.indexrelid) AS def, i.indisunique, i.indisprimary,
               c.relname AS name
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = 'intents'::regclass
    LOOP
        IF idx.indisprimary OR idx.name = 'intents_idempotency_key_key' THEN
            CONTINUE;  -- replaced by PRIMARY KEY (id, created_at) and intent_keys
        ELSIF idx.indisunique THEN
            RAISE EXCEPTION 'unique index % cannot move to the partitioned intents', idx.name;
        END IF;
        indexes := indexes || idx.def;
    END LOOP;
    FOR fk IN
        SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint
        WHERE conrelid = 'intents'::regclass AND contype = 'f'
    LOOP
        fks := fks || format('ALTER TABLE intents ADD CONSTRAINT %I %s', fk.conname, fk.def);
    END LOOP;
    SELECT min(created_at) INTO oldest FROM intents;

    ALTER TABLE intents RENAME TO intents_unpartitioned;
    CREATE TABLE intents (
        LIKE intents_unpartitioned
        INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED INCLUDING STORAGE
        INCLUDING COMMENTS
    ) PARTITION BY RANGE (created_at);
    -- Rows outside every monthly partition (clock jumps, a command not run) land here
    -- rather than failing an insert; sluice_create_intent_partitions moves them out.
    CREATE TABLE intents_default PARTITION OF intents DEFAULT;
    -- monthly partitions back to the oldest row, at most a year; anything older stays in
    -- the default partition
    PERFORM sluice_create_intent_partitions(2, now(), greatest(oldest, now() - interval '12 months'));
    INSERT INTO intents SELECT * FROM intents_unpartitioned;
    DROP TABLE intents_unpartitioned;
    -- after the copy: building indexes once is faster than maintaining them row by row
    ALTER TABLE intents ADD PRIMARY KEY (id, created_at);
    FOREACH statement IN ARRAY indexes LOOP
        EXECUTE statement;
    END LOOP;
    FOREACH statement IN ARRAY fks LOOP
        EXECUTE statement;
    END LOOP;
END
$$;
