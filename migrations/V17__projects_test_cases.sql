-- Test cases and their executions belong to a project (issue 15): keys are
-- unique per project (two teams' `test-001` are two test cases), and every
-- list, statistic and write works within the call's project.

-- Everything stored so far belongs to the project `default`. The column is
-- added, filled and constrained in steps: no DEFAULT is left behind, so
-- every INSERT names its project.
ALTER TABLE test_cases ADD COLUMN project_id uuid;
UPDATE test_cases SET project_id = (SELECT id FROM projects WHERE slug = 'default');
ALTER TABLE test_cases
    ALTER COLUMN project_id SET NOT NULL,
    ADD CONSTRAINT test_cases_project_id_fkey
        FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE;

-- The key (CreateTestCase's idempotency key) is unique per project. This
-- index also serves the unfiltered ListTestCases (key order within a
-- project) and lookups by key.
ALTER TABLE test_cases DROP CONSTRAINT test_cases_key_key;
ALTER TABLE test_cases
    ADD CONSTRAINT test_cases_project_key_key UNIQUE (project_id, key);
-- The target of the executions' composite foreign key: an execution can
-- never sit in another project than its test case.
ALTER TABLE test_cases
    ADD CONSTRAINT test_cases_project_id_id_key UNIQUE (project_id, id);

-- The type and subsystem filters of ListTestCases, within a project, in key
-- order. The tag filter keeps its GIN index on tags alone (a GIN index
-- cannot lead with a uuid without the btree_gin extension); the planner
-- combines it with the project's rows through the (project_id, key) index.
DROP INDEX test_cases_type_key_idx;
DROP INDEX test_cases_subsystem_key_idx;
CREATE INDEX test_cases_project_type_key_idx ON test_cases (project_id, test_type, key);
CREATE INDEX test_cases_project_subsystem_key_idx
    ON test_cases (project_id, target_subsystem, key);

-- Executions carry their test case's project (denormalised, so the
-- per-project lists and statistics are served by indexes leading with it).
ALTER TABLE test_executions ADD COLUMN project_id uuid;
UPDATE test_executions e SET project_id = t.project_id
FROM test_cases t WHERE t.id = e.test_case_id;
ALTER TABLE test_executions
    ALTER COLUMN project_id SET NOT NULL,
    ADD CONSTRAINT test_executions_project_id_fkey
        FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE;
-- The test case is named with its project: an execution and its test case
-- are always in the same project. Still cascades from a forced
-- DeleteTestCase. (The session reference stays a plain foreign key to
-- sessions (id); the gateway checks that a named session is in the call's
-- project before it writes.)
ALTER TABLE test_executions DROP CONSTRAINT test_executions_test_case_id_fkey;
ALTER TABLE test_executions
    ADD CONSTRAINT test_executions_project_test_case_fkey
        FOREIGN KEY (project_id, test_case_id) REFERENCES test_cases (project_id, id)
        ON DELETE CASCADE;

-- ListExecutions pages newest first by (started_at, id) within a project:
-- by test case (also the per-test window of flakiness, the existence check
-- of DeleteTestCase and the composite foreign key's cascade), by status and
-- unfiltered; GetTestStatistics reads its window through the last one.
DROP INDEX test_executions_case_started_idx;
DROP INDEX test_executions_status_started_idx;
DROP INDEX test_executions_started_idx;
CREATE INDEX test_executions_project_case_started_idx
    ON test_executions (project_id, test_case_id, started_at DESC, id DESC);
CREATE INDEX test_executions_project_status_started_idx
    ON test_executions (project_id, status, started_at DESC, id DESC);
CREATE INDEX test_executions_project_started_idx
    ON test_executions (project_id, started_at DESC, id DESC);
-- test_executions_session_started_idx (session_id, started_at DESC, id DESC)
-- is kept as it is: a session lies in one project, so its executions are
-- found by session id alone (ListExecutions by session, which also filters
-- on the project; exports; the cascade of DeleteSession and the cleanup,
-- which name sessions only).

-- Replies to replayed RecordExecutions batches, within a project.
DROP INDEX test_executions_batch_idx;
CREATE INDEX test_executions_project_batch_idx
    ON test_executions (project_id, batch_id, batch_position) WHERE batch_id IS NOT NULL;
