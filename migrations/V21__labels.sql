-- Key/value labels on sessions, executions and coverage reports, as test
-- runs have them (V20): a jsonb object of strings (at most 32 labels, keys
-- 1..64 characters, values up to 256, checked by the gateway), '{}' when a
-- client sets none. Lists filter them with @> (every given label with its
-- value) and ?& (every given key, whatever the value).
--
-- A constant DEFAULT makes each ADD COLUMN a catalogue change only: no
-- table rewrite, rows stored before read back as '{}'.
ALTER TABLE sessions ADD COLUMN labels jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE test_executions ADD COLUMN labels jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE coverage_reports ADD COLUMN labels jsonb NOT NULL DEFAULT '{}'::jsonb;

-- The label filters' indexes. jsonb_ops (the default class), not
-- jsonb_path_ops: only jsonb_ops serves the presence operator ?&. A GIN
-- index cannot lead with project_id without the btree_gin extension; the
-- planner uses it when a label is rarer than the project's rows in list
-- order, and the lists' own (project_id, ...) indexes otherwise.
CREATE INDEX sessions_labels_idx ON sessions USING gin (labels);
CREATE INDEX test_executions_labels_idx ON test_executions USING gin (labels);
CREATE INDEX coverage_reports_labels_idx ON coverage_reports USING gin (labels);
