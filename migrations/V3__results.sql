-- Validation results: the outcome of validating a session's migration.
CREATE TABLE results (
    -- Leads every key so the table can later be distributed by session.
    session_id            uuid             NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    id                    uuid             NOT NULL,
    -- The client's idempotency key: a retried RecordResult finds the stored row.
    request_id            text             NOT NULL,
    result_type           text             NOT NULL
        CHECK (result_type IN ('static', 'behavioral', 'hybrid')),
    overall_status        text             NOT NULL
        CHECK (overall_status IN ('passed', 'failed', 'warning', 'error')),
    fidelity_score        double precision NOT NULL CHECK (fidelity_score BETWEEN 0 AND 1),
    summary               text             NOT NULL DEFAULT '',
    execution_time_ms     bigint           NOT NULL DEFAULT 0 CHECK (execution_time_ms >= 0),
    source_representation jsonb            NOT NULL DEFAULT '{}'::jsonb,
    target_representation jsonb            NOT NULL DEFAULT '{}'::jsonb,
    created_at            timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, id),
    UNIQUE (session_id, request_id)
);

-- GetResult looks a result up by id alone.
CREATE INDEX results_id_idx ON results (id);
-- ListResults pages newest first, by session or across sessions.
CREATE INDEX results_session_created_idx ON results (session_id, created_at DESC, id DESC);
CREATE INDEX results_created_idx ON results (created_at DESC, id DESC);
