-- The audit trail per project: every event records the project its call
-- worked in, and ListAuditEvents reads one project's trail.
--
-- No foreign key to `projects`: the trail outlives a deleted project (it is
-- the record of what was done there, deletion included), and it stays
-- append-only (V12) — deleting a project must not delete or rewrite it.
--
-- The existing rows belong to `default`. They are not UPDATEd (the V12
-- trigger refuses any UPDATE, and rewriting a large trail would be slow):
-- the column is added with a constant DEFAULT, which PostgreSQL stores once
-- in the catalog and reads for every existing row without rewriting the
-- table, then the default is dropped so that every INSERT must name its
-- project. The id is a constant only known here, hence the DO block.
DO $$
DECLARE
    default_id uuid := (SELECT id FROM projects WHERE slug = 'default');
BEGIN
    IF default_id IS NULL THEN
        RAISE EXCEPTION 'the project default is missing (V14)';
    END IF;
    EXECUTE format(
        'ALTER TABLE audit_events ADD COLUMN project_id uuid NOT NULL DEFAULT %L',
        default_id);
END
$$;
ALTER TABLE audit_events ALTER COLUMN project_id DROP DEFAULT;

-- ListAuditEvents pages one project's trail newest first by id, optionally
-- per key or per RPC: each index leads with the project. The per-target GIN
-- index stays as it is (a GIN index cannot lead with a uuid without the
-- btree_gin extension); the project filter applies to what it finds.
DROP INDEX audit_events_key_idx;
DROP INDEX audit_events_rpc_idx;
CREATE INDEX audit_events_project_idx ON audit_events (project_id, id DESC);
CREATE INDEX audit_events_project_key_idx ON audit_events (project_id, key_id, id DESC);
CREATE INDEX audit_events_project_rpc_idx ON audit_events (project_id, rpc, id DESC);
