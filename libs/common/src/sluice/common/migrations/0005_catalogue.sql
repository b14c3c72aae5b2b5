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
