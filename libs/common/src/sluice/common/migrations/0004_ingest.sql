-- 0004_ingest: what ingest's front door records on an intent.
--
-- run: the occurrence of a recurring campaign ("2026-W49"), part of the derived idempotency
-- key, so next week's run is new mail and a retry of this week's is not.
-- smtputf8: the recipient needs SMTPUTF8 (internationalised local part); the router may
-- hand such an intent only to a provider that can take it.
-- Both have constant defaults, so adding them rewrites no rows.
ALTER TABLE intents
    ADD COLUMN run text NOT NULL DEFAULT '',
    ADD COLUMN smtputf8 boolean NOT NULL DEFAULT false;
