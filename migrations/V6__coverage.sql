-- Coverage reports: coverage of one commit (whole code base or one
-- subsystem), with totals; per-file rows live in coverage_files.
CREATE TABLE coverage_reports (
    id                uuid        PRIMARY KEY,
    -- Optional: the session that produced the report; DeleteSession removes
    -- its reports (and their files) with it.
    session_id        uuid        REFERENCES sessions (id) ON DELETE CASCADE,
    -- Lower-case hex.
    commit_sha        text        NOT NULL,
    branch            text        NOT NULL,
    -- '' for the whole code base (so it can take part in the unique key).
    subsystem         text        NOT NULL DEFAULT '',
    -- The client's idempotency key: a retried RecordCoverage finds the stored row.
    client_key        text        NOT NULL,
    lines_covered     bigint      NOT NULL,
    lines_total       bigint      NOT NULL,
    branches_covered  bigint      NOT NULL,
    branches_total    bigint      NOT NULL,
    functions_covered bigint      NOT NULL,
    functions_total   bigint      NOT NULL,
    file_count        integer     NOT NULL DEFAULT 0,
    -- When the coverage was measured (client-given, defaults to now): trends
    -- and windows use it, so history can be backfilled.
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (commit_sha, subsystem, client_key),
    CHECK (lines_covered BETWEEN 0 AND lines_total),
    CHECK (branches_covered BETWEEN 0 AND branches_total),
    CHECK (functions_covered BETWEEN 0 AND functions_total)
);

-- CompareCoverage takes the latest report of a commit and subsystem.
CREATE INDEX coverage_reports_commit_idx
    ON coverage_reports (commit_sha, subsystem, recorded_at DESC, id DESC);
-- Aggregates and trends filter by branch (and subsystem) over recorded_at.
CREATE INDEX coverage_reports_branch_idx
    ON coverage_reports (branch, subsystem, recorded_at DESC, id DESC);
CREATE INDEX coverage_reports_recorded_idx ON coverage_reports (recorded_at DESC, id DESC);
-- DeleteSession's cascade finds a session's reports without a scan.
CREATE INDEX coverage_reports_session_idx ON coverage_reports (session_id)
    WHERE session_id IS NOT NULL;

-- Coverage of one file within a report.
CREATE TABLE coverage_files (
    report_id         uuid   NOT NULL REFERENCES coverage_reports (id) ON DELETE CASCADE,
    -- The report's session, carried so the table can later be distributed by
    -- session like the others (removed with the report).
    session_id        uuid,
    path              text   NOT NULL,
    lines_covered     bigint NOT NULL,
    lines_total       bigint NOT NULL,
    branches_covered  bigint NOT NULL,
    branches_total    bigint NOT NULL,
    functions_covered bigint NOT NULL,
    functions_total   bigint NOT NULL,
    -- Also the path-ordered index CompareCoverage joins base and head on.
    PRIMARY KEY (report_id, path),
    CHECK (lines_covered BETWEEN 0 AND lines_total),
    CHECK (branches_covered BETWEEN 0 AND branches_total),
    CHECK (functions_covered BETWEEN 0 AND functions_total)
);
