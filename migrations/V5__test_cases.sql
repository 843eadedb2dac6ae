-- Test cases: test definitions, identified by the client's unique key.
CREATE TABLE test_cases (
    id                uuid        PRIMARY KEY,
    -- The client's key (e.g. `test-001`), also the idempotency key of
    -- CreateTestCase: a retry finds the stored row.
    key               text        NOT NULL UNIQUE,
    name              text        NOT NULL,
    description       text        NOT NULL DEFAULT '',
    test_type         text        NOT NULL
        CHECK (test_type IN ('unit', 'integration', 'behavioral', 'performance', 'security', 'e2e')),
    -- '' when the test targets no particular subsystem (keeps equality
    -- filters and their index simple).
    target_subsystem  text        NOT NULL DEFAULT '',
    required_hardware jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Sorted and without duplicates (the gateway normalises them).
    tags              text[]      NOT NULL DEFAULT '{}',
    -- Optimistic concurrency: every update increments it; UpdateTestCase and
    -- DeleteTestCase take the version the caller read and answer ABORTED when
    -- it moved.
    version           bigint      NOT NULL DEFAULT 1,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- ListTestCases pages in key order: the unique index on key serves the
-- unfiltered list; the type and subsystem filters get an index ending in the
-- sort key each.
CREATE INDEX test_cases_type_key_idx ON test_cases (test_type, key);
CREATE INDEX test_cases_subsystem_key_idx ON test_cases (target_subsystem, key);
-- The tag filter (`tags @> ARRAY[tag]`).
CREATE INDEX test_cases_tags_idx ON test_cases USING gin (tags);

-- One run of a test case (behavioral scenarios included).
CREATE TABLE test_executions (
    id              uuid        PRIMARY KEY,
    -- Executions go with their test case when DeleteTestCase is forced; the
    -- unforced delete refuses while any exists.
    test_case_id    uuid        NOT NULL REFERENCES test_cases (id) ON DELETE CASCADE,
    -- Optional: the session the execution ran in. Executions are part of what
    -- a session produced, so DeleteSession removes them with it (as it does
    -- results and discrepancies) rather than leaving detached rows behind.
    session_id      uuid        REFERENCES sessions (id) ON DELETE CASCADE,
    status          text        NOT NULL CHECK (status IN ('passed', 'failed', 'skipped', 'error')),
    started_at      timestamptz NOT NULL,
    duration_ms     bigint      NOT NULL DEFAULT 0 CHECK (duration_ms >= 0),
    environment     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    error_message   text        NOT NULL DEFAULT '',
    stack_trace     text        NOT NULL DEFAULT '',
    screenshot_refs text[]      NOT NULL DEFAULT '{}',
    -- A JSON array of step objects, in order.
    interaction_log jsonb       NOT NULL DEFAULT '[]'::jsonb,
    -- A JSON object of named finite numbers.
    performance     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Where the row came from: a RecordExecutions batch (with its position,
    -- so a replay answers with the same ids in the same order) or an ingest.
    batch_id        text,
    batch_position  integer,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- ListExecutions pages newest first by (started_at, id): by test case (also
-- the per-test window of flakiness and the existence check of
-- DeleteTestCase), by session, by status and unfiltered.
CREATE INDEX test_executions_case_started_idx
    ON test_executions (test_case_id, started_at DESC, id DESC);
CREATE INDEX test_executions_session_started_idx
    ON test_executions (session_id, started_at DESC, id DESC) WHERE session_id IS NOT NULL;
CREATE INDEX test_executions_status_started_idx
    ON test_executions (status, started_at DESC, id DESC);
CREATE INDEX test_executions_started_idx ON test_executions (started_at DESC, id DESC);
-- Replies to replayed batches.
CREATE INDEX test_executions_batch_idx ON test_executions (batch_id, batch_position)
    WHERE batch_id IS NOT NULL;
