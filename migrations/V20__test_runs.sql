-- CI test runs: "build 4711 of branch main at commit abc ran 12,000 tests".
-- A run belongs to a project; executions attach to it with an attempt number
-- (retries), and its counts are computed from them (last attempt of each
-- test case).
CREATE TABLE test_runs (
    id             uuid        PRIMARY KEY,
    project_id     uuid        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    -- The client's idempotency key (e.g. `<pipeline>-<build>`), unique per
    -- project, and the digest of the content first sent with it.
    client_key     text        NOT NULL CHECK (length(client_key) BETWEEN 1 AND 200),
    content_digest bytea       NOT NULL,
    name           text        NOT NULL DEFAULT '',
    build_number   text        NOT NULL DEFAULT '',
    build_url      text        NOT NULL DEFAULT '',
    commit_sha     text        NOT NULL DEFAULT '',
    branch         text        NOT NULL DEFAULT '',
    -- 0: not a pull-request build.
    pull_request   bigint      NOT NULL DEFAULT 0 CHECK (pull_request >= 0),
    status         text        NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'passed', 'failed', 'cancelled')),
    -- Key/value labels (strings), filtered with @> (equality) and ?& (presence).
    labels         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    started_at     timestamptz NOT NULL,
    finished_at    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    version        bigint      NOT NULL DEFAULT 1,
    UNIQUE (project_id, client_key),
    UNIQUE (project_id, id)
);

-- ListTestRuns pages newest first per project, optionally per branch.
CREATE INDEX test_runs_started_idx ON test_runs (project_id, started_at DESC, id DESC);
CREATE INDEX test_runs_branch_idx ON test_runs (project_id, branch, started_at DESC, id DESC);
CREATE INDEX test_runs_commit_idx ON test_runs (project_id, commit_sha);
-- Label equality and presence filters.
CREATE INDEX test_runs_labels_idx ON test_runs USING gin (labels);

-- An execution may belong to a run, with its attempt within the run (1 for
-- the first try, 2 for the first retry, ...). Deleting a run deletes its
-- executions.
ALTER TABLE test_executions
    ADD COLUMN run_id  uuid REFERENCES test_runs (id) ON DELETE CASCADE,
    ADD COLUMN attempt integer NOT NULL DEFAULT 1 CHECK (attempt BETWEEN 1 AND 1000);
-- A run's counts read its executions per test case, last attempt first.
CREATE INDEX test_executions_run_idx
    ON test_executions (run_id, test_case_id, attempt DESC, started_at DESC)
    WHERE run_id IS NOT NULL;
