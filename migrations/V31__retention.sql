-- Retention per kind of data, per project (src/admin/retention.rs).
--
-- Each column is the project's override of the gateway's default
-- (`VERDICT_RETENTION_<KIND>_DAYS`): NULL inherits the default, 0 keeps the
-- kind forever, N deletes rows older than N days. A century (of 366-day
-- years) at most, so `now() - N days` stays a valid time.
ALTER TABLE projects
    ADD COLUMN retention_sessions_days       integer CHECK (retention_sessions_days BETWEEN 0 AND 36600),
    ADD COLUMN retention_executions_days     integer CHECK (retention_executions_days BETWEEN 0 AND 36600),
    ADD COLUMN retention_coverage_days       integer CHECK (retention_coverage_days BETWEEN 0 AND 36600),
    ADD COLUMN retention_test_runs_days      integer CHECK (retention_test_runs_days BETWEEN 0 AND 36600),
    ADD COLUMN retention_metric_points_days  integer CHECK (retention_metric_points_days BETWEEN 0 AND 36600),
    ADD COLUMN retention_metric_rollups_days integer CHECK (retention_metric_rollups_days BETWEEN 0 AND 36600),
    ADD COLUMN retention_audit_events_days   integer CHECK (retention_audit_events_days BETWEEN 0 AND 36600),
    ADD COLUMN retention_ingest_days         integer CHECK (retention_ingest_days BETWEEN 0 AND 36600),
    ADD COLUMN retention_resolutions_days    integer CHECK (retention_resolutions_days BETWEEN 0 AND 36600);

-- Each batch of a retention run picks its oldest expired rows through an
-- index leading with (project_id, <the kind's time>), so a batch reads
-- about as many index entries as it deletes, whatever the table's size,
-- and never re-reads the rows it keeps.

-- Metric points by recorded time (the existing index leads with the name).
CREATE INDEX metric_points_project_recorded_idx ON metric_points (project_id, recorded_at);
-- Executions of no session and no run (those go with their session or run).
CREATE INDEX test_executions_detached_started_idx
    ON test_executions (project_id, started_at) WHERE session_id IS NULL AND run_id IS NULL;
-- Coverage reports of no session (those go with their session).
CREATE INDEX coverage_reports_detached_recorded_idx
    ON coverage_reports (project_id, recorded_at) WHERE session_id IS NULL;
-- Ingest bookkeeping by commit / last-chunk time.
CREATE INDEX ingest_batches_project_committed_idx ON ingest_batches (project_id, committed_at);
CREATE INDEX ingest_marks_project_updated_idx ON ingest_marks (project_id, updated_at);
-- Resolution history by change time.
CREATE INDEX discrepancy_resolutions_project_changed_idx
    ON discrepancy_resolutions (project_id, changed_at);
