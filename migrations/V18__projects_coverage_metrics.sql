-- Projects for coverage, metric points and rollups: every row belongs to
-- one project (everything stored before is moved to `default`), client
-- keys are unique per project, and the indexes that serve per-project
-- aggregates, trends, time series and rollup lists lead with project_id.
-- No DEFAULT is left on project_id: every INSERT names its project.

-- coverage_reports ---------------------------------------------------------

ALTER TABLE coverage_reports ADD COLUMN project_id uuid;
UPDATE coverage_reports SET project_id = (SELECT id FROM projects WHERE slug = 'default');
ALTER TABLE coverage_reports ALTER COLUMN project_id SET NOT NULL;
ALTER TABLE coverage_reports
    ADD CONSTRAINT coverage_reports_project_fkey
    FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE;
-- The target of coverage_files' composite foreign key, so a file row can
-- never sit in another project than its report.
ALTER TABLE coverage_reports
    ADD CONSTRAINT coverage_reports_project_id_key UNIQUE (project_id, id);
-- A client key is unique per project: two projects may record the same
-- commit, subsystem and key, each getting its own report. (A referenced
-- session is checked to be in the report's project by the INSERT itself:
-- sessions belong to another area, so no composite key to them here.)
ALTER TABLE coverage_reports DROP CONSTRAINT coverage_reports_commit_sha_subsystem_client_key_key;
ALTER TABLE coverage_reports
    ADD CONSTRAINT coverage_reports_client_key_key
    UNIQUE (project_id, commit_sha, subsystem, client_key);

-- CompareCoverage takes the latest report of a commit and subsystem.
DROP INDEX coverage_reports_commit_idx;
CREATE INDEX coverage_reports_commit_idx
    ON coverage_reports (project_id, commit_sha, subsystem, recorded_at DESC, id DESC);
-- Aggregates and trends filter by branch (and subsystem) over recorded_at.
DROP INDEX coverage_reports_branch_idx;
CREATE INDEX coverage_reports_branch_idx
    ON coverage_reports (project_id, branch, subsystem, recorded_at DESC, id DESC);
-- Aggregates and trends without a branch filter: a time range of one project.
DROP INDEX coverage_reports_recorded_idx;
CREATE INDEX coverage_reports_recorded_idx
    ON coverage_reports (project_id, recorded_at DESC, id DESC);
-- coverage_reports_session_idx (session_id) stays: DeleteSession's cascade
-- finds a session's reports by session id alone.

-- coverage_files -----------------------------------------------------------

ALTER TABLE coverage_files ADD COLUMN project_id uuid;
-- Every report is in `default` at this point, so its files are too.
UPDATE coverage_files SET project_id = (SELECT id FROM projects WHERE slug = 'default');
ALTER TABLE coverage_files ALTER COLUMN project_id SET NOT NULL;
-- Carried from the report (denormalised): the key below leads with it, and
-- the composite foreign key keeps it equal to the report's. Deleting the
-- report (or its project) deletes its files.
ALTER TABLE coverage_files DROP CONSTRAINT coverage_files_report_id_fkey;
ALTER TABLE coverage_files
    ADD CONSTRAINT coverage_files_report_fkey
    FOREIGN KEY (project_id, report_id) REFERENCES coverage_reports (project_id, id)
    ON DELETE CASCADE;
-- Also the path-ordered index CompareCoverage joins base and head on.
ALTER TABLE coverage_files DROP CONSTRAINT coverage_files_pkey;
ALTER TABLE coverage_files ADD PRIMARY KEY (project_id, report_id, path);

-- metric_points ------------------------------------------------------------

ALTER TABLE metric_points ADD COLUMN project_id uuid;
UPDATE metric_points SET project_id = (SELECT id FROM projects WHERE slug = 'default');
ALTER TABLE metric_points ALTER COLUMN project_id SET NOT NULL;
ALTER TABLE metric_points
    ADD CONSTRAINT metric_points_project_fkey
    FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE;
-- QueryTimeSeries reads one metric of one project over a time range.
DROP INDEX metric_points_name_time_idx;
CREATE INDEX metric_points_name_time_idx ON metric_points (project_id, name, recorded_at);
-- The GIN index on labels goes: it cannot lead with project_id (not without
-- the btree_gin extension), so the planner ANDed it with the index above
-- and a one-project query read every project's entries for the label
-- (20 projects x 50,000 points: 262,500 entries, 56 ms for a one-day series
-- with it, 18 ms without). Label filters are checked on the rows of one
-- project, metric and range, which the index above finds.
DROP INDEX metric_points_labels_idx;

-- metric_rollups -----------------------------------------------------------

ALTER TABLE metric_rollups ADD COLUMN project_id uuid;
UPDATE metric_rollups SET project_id = (SELECT id FROM projects WHERE slug = 'default');
ALTER TABLE metric_rollups ALTER COLUMN project_id SET NOT NULL;
ALTER TABLE metric_rollups
    ADD CONSTRAINT metric_rollups_project_fkey
    FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE;
-- One row per project, period kind and period start (the upsert's target
-- and ListRollups' keyset order).
ALTER TABLE metric_rollups DROP CONSTRAINT metric_rollups_pkey;
ALTER TABLE metric_rollups ADD PRIMARY KEY (project_id, period, period_start);

-- rollup_watermarks --------------------------------------------------------

ALTER TABLE rollup_watermarks ADD COLUMN project_id uuid;
UPDATE rollup_watermarks SET project_id = (SELECT id FROM projects WHERE slug = 'default');
ALTER TABLE rollup_watermarks ALTER COLUMN project_id SET NOT NULL;
ALTER TABLE rollup_watermarks
    ADD CONSTRAINT rollup_watermarks_project_fkey
    FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE;
-- Each project's rollups are computed up to their own time: computing one
-- project never hides another's changes from its next incremental run.
ALTER TABLE rollup_watermarks DROP CONSTRAINT rollup_watermarks_pkey;
ALTER TABLE rollup_watermarks ADD PRIMARY KEY (project_id, period);
