-- 0007_submission_extras: what a client may add to a message besides its template.
--
-- reply_to: the Reply-To address, checked and in ASCII form (sluice.ingest.extras).
-- headers: allow-listed custom headers, {"X-Campaign": "spring"} (sluice.common.headers).
-- tags: provider tags (SES message tags, SendGrid custom_args, Resend tags), {"cohort": "b"}.
-- NULL when not given, which is most intents: a NULL costs a bit in the row's null bitmap,
-- where an empty JSON object would cost bytes in every row. Nullable columns without a
-- default are a catalogue change only; on the partitioned parent they reach every partition
-- (and the partitions sluice_create_intent_partitions makes later, LIKE intents).
ALTER TABLE intents
    ADD COLUMN reply_to text,
    ADD COLUMN headers jsonb,
    ADD COLUMN tags jsonb;
