-- Project scoping of discrepancies, their resolution history, fingerprint
-- rules and the shared ingest bookkeeping (issue 15). Every row gets the
-- project it belongs to; everything stored before projects belongs to
-- `default`. Uniqueness that was global (fingerprint rules, batch ids,
-- ingest ids) becomes per project, and the indexes of per-project lists
-- lead with `project_id`. No DEFAULT is left: every INSERT names its project.

-- sessions.project_id and UNIQUE (project_id, id) on sessions come from V15
-- (the sessions area). Only a database where V15 did not add them (this
-- migration's branch built and tested on its own, before V15 existed) gets
-- them here, with sessions placed in `default`; after V15 this block does
-- nothing.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'sessions'
          AND column_name = 'project_id'
    ) THEN
        ALTER TABLE sessions
            ADD COLUMN project_id uuid REFERENCES projects (id) ON DELETE CASCADE;
        UPDATE sessions SET project_id = (SELECT id FROM projects WHERE slug = 'default');
        EXECUTE format('ALTER TABLE sessions ALTER COLUMN project_id SET DEFAULT %L',
                       (SELECT id FROM projects WHERE slug = 'default'));
        ALTER TABLE sessions ALTER COLUMN project_id SET NOT NULL;
        ALTER TABLE sessions ADD CONSTRAINT sessions_project_id_id_key UNIQUE (project_id, id);
    END IF;
END
$$;

-- Discrepancies: in the project of their session (a composite key, so a
-- discrepancy can never sit in another project than its session).
ALTER TABLE discrepancies ADD COLUMN project_id uuid;
UPDATE discrepancies SET project_id = (SELECT id FROM projects WHERE slug = 'default');
ALTER TABLE discrepancies ALTER COLUMN project_id SET NOT NULL;
ALTER TABLE discrepancies
    ADD CONSTRAINT discrepancies_project_id_fkey
        FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE;
ALTER TABLE discrepancies DROP CONSTRAINT discrepancies_session_id_fkey;
ALTER TABLE discrepancies
    ADD CONSTRAINT discrepancies_project_session_fkey
        FOREIGN KEY (project_id, session_id) REFERENCES sessions (project_id, id) ON DELETE CASCADE;

-- Resolution history: in the project of its discrepancy.
ALTER TABLE discrepancy_resolutions ADD COLUMN project_id uuid;
UPDATE discrepancy_resolutions SET project_id = (SELECT id FROM projects WHERE slug = 'default');
ALTER TABLE discrepancy_resolutions ALTER COLUMN project_id SET NOT NULL;
ALTER TABLE discrepancy_resolutions
    DROP CONSTRAINT discrepancy_resolutions_session_id_discrepancy_id_fkey;
ALTER TABLE discrepancy_resolutions DROP CONSTRAINT discrepancy_resolutions_pkey;

-- The key of a discrepancy leads with its project; ResolveDiscrepancy and
-- ListResolutionHistory find one by (project, id).
ALTER TABLE discrepancies DROP CONSTRAINT discrepancies_pkey;
ALTER TABLE discrepancies ADD PRIMARY KEY (project_id, session_id, id);
DROP INDEX discrepancies_id_idx;
CREATE INDEX discrepancies_project_id_idx ON discrepancies (project_id, id);

-- History of one discrepancy (ListResolutionHistory) and of a session's
-- discrepancies (exports) in order.
ALTER TABLE discrepancy_resolutions ADD PRIMARY KEY (project_id, session_id, discrepancy_id, id);
ALTER TABLE discrepancy_resolutions
    ADD CONSTRAINT discrepancy_resolutions_discrepancy_fkey
        FOREIGN KEY (project_id, session_id, discrepancy_id)
        REFERENCES discrepancies (project_id, session_id, id) ON DELETE CASCADE;

-- ListDiscrepancies order, per session and across a project's sessions;
-- the fingerprint filter and fingerprint-wide resolution; batch replies.
DROP INDEX discrepancies_session_order_idx;
CREATE INDEX discrepancies_session_order_idx
    ON discrepancies (project_id, session_id, severity, created_at DESC, id DESC);
DROP INDEX discrepancies_order_idx;
CREATE INDEX discrepancies_order_idx
    ON discrepancies (project_id, severity, created_at DESC, id DESC);
DROP INDEX discrepancies_fingerprint_idx;
CREATE INDEX discrepancies_fingerprint_idx ON discrepancies (project_id, fingerprint);
DROP INDEX discrepancies_batch_idx;
CREATE INDEX discrepancies_batch_idx ON discrepancies (project_id, session_id, batch_id, batch_position)
    WHERE batch_id IS NOT NULL;

-- Fingerprint rules: muting a fingerprint in one project never mutes it in
-- another.
ALTER TABLE fingerprint_rules ADD COLUMN project_id uuid;
UPDATE fingerprint_rules SET project_id = (SELECT id FROM projects WHERE slug = 'default');
ALTER TABLE fingerprint_rules ALTER COLUMN project_id SET NOT NULL;
ALTER TABLE fingerprint_rules
    ADD CONSTRAINT fingerprint_rules_project_id_fkey
        FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE;
ALTER TABLE fingerprint_rules DROP CONSTRAINT fingerprint_rules_pkey;
ALTER TABLE fingerprint_rules ADD PRIMARY KEY (project_id, fingerprint);

-- Batch ids: one per (project, kind, scope); the same batch_id in another
-- project is another batch.
ALTER TABLE ingest_batches ADD COLUMN project_id uuid;
UPDATE ingest_batches SET project_id = (SELECT id FROM projects WHERE slug = 'default');
ALTER TABLE ingest_batches ALTER COLUMN project_id SET NOT NULL;
ALTER TABLE ingest_batches
    ADD CONSTRAINT ingest_batches_project_id_fkey
        FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE;
ALTER TABLE ingest_batches DROP CONSTRAINT ingest_batches_pkey;
ALTER TABLE ingest_batches ADD PRIMARY KEY (project_id, kind, scope, batch_id);

-- Ingest ids: one per (project, kind); the same ingest_id in another
-- project is another ingest, with its own high-water mark.
ALTER TABLE ingest_marks ADD COLUMN project_id uuid;
UPDATE ingest_marks SET project_id = (SELECT id FROM projects WHERE slug = 'default');
ALTER TABLE ingest_marks ALTER COLUMN project_id SET NOT NULL;
ALTER TABLE ingest_marks
    ADD CONSTRAINT ingest_marks_project_id_fkey
        FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE;
ALTER TABLE ingest_marks DROP CONSTRAINT ingest_marks_pkey;
ALTER TABLE ingest_marks ADD PRIMARY KEY (project_id, kind, ingest_id);
