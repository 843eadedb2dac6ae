-- One idempotency rule for every client key (request_id, test case key,
-- coverage client_key, batch_id): same key + same content -> the stored
-- outcome; same key + other content -> FAILED_PRECONDITION
-- IDEMPOTENCY_KEY_REUSED. "Same content" is decided on a SHA-256 of the
-- request's validated content in a canonical form (map and Struct keys
-- sorted; see src/digest.rs), recorded here by the write that used the key
-- first, in its own transaction.
--
-- Rows written before this migration have no digest (NULL); a replay
-- against one is decided as follows (see each RPC's proto comment):
-- - sessions and results never change their content, and test cases still
--   at version 1 hold what created them: the gateway recomputes the digest
--   from the row and compares;
-- - anything else (coverage reports, whose recorded_at may have been a
--   server default; test cases updated since; batches, whose pre-V11
--   digest was taken over a non-canonical encoding) cannot be shown to be
--   the same content, so the replay is refused with IDEMPOTENCY_KEY_REUSED
--   (fail closed: a key never hands out content it cannot prove the caller
--   sent). Nothing is backfilled: SQL cannot compute the canonical digest.

ALTER TABLE sessions ADD COLUMN content_digest bytea;
ALTER TABLE results ADD COLUMN content_digest bytea;
-- The digest of the CreateTestCase content: UpdateTestCase leaves it as it
-- is, so a replay of the original create is recognised after an update.
ALTER TABLE test_cases ADD COLUMN content_digest bytea;
-- Of the report and its files (sorted by path).
ALTER TABLE coverage_reports ADD COLUMN content_digest bytea;

-- Batches: the canonical digest goes in a new column; the old `digest`
-- (of a prost re-encoding, whose map order varied between calls) is kept
-- for the rows that have it but no longer written or compared.
ALTER TABLE ingest_batches ADD COLUMN content_digest bytea;
ALTER TABLE ingest_batches ALTER COLUMN digest DROP NOT NULL;
