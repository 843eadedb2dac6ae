-- Projects for sessions, their logs and their results (see V14).
--
-- Every row says its project; rows stored before projects belong to
-- `default`. Logs and results carry the project of their session
-- (denormalised, so their indexes can lead with it and the tables can later
-- be distributed by project), and a composite foreign key to
-- `sessions (project_id, id)` keeps them in their session's project. There
-- is no default: every INSERT names its project.
--
-- `sessions.id` stays the primary key: discrepancies, test executions and
-- coverage reports reference sessions by id, and `UNIQUE (project_id, id)`
-- is there for composite references.

-- sessions ------------------------------------------------------------------

ALTER TABLE sessions ADD COLUMN project_id uuid;
UPDATE sessions SET project_id = (SELECT id FROM projects WHERE slug = 'default');
ALTER TABLE sessions ALTER COLUMN project_id SET NOT NULL;
ALTER TABLE sessions
    ADD CONSTRAINT sessions_project_id_fkey
        FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE;
ALTER TABLE sessions
    ADD CONSTRAINT sessions_project_id_id_key UNIQUE (project_id, id);

-- A client's idempotency key is unique within its project: a retry in
-- project B of a request_id used in project A creates B's own session.
ALTER TABLE sessions DROP CONSTRAINT sessions_request_id_key;
ALTER TABLE sessions
    ADD CONSTRAINT sessions_project_id_request_id_key UNIQUE (project_id, request_id);

-- ListSessions pages newest first by (created_at, id) within the project:
-- unfiltered, by status, and by technology pair.
DROP INDEX sessions_created_idx;
DROP INDEX sessions_status_created_idx;
DROP INDEX sessions_technologies_created_idx;
CREATE INDEX sessions_project_created_idx
    ON sessions (project_id, created_at DESC, id DESC);
CREATE INDEX sessions_project_status_created_idx
    ON sessions (project_id, status, created_at DESC, id DESC);
CREATE INDEX sessions_project_technologies_created_idx
    ON sessions (project_id, source_technology, target_technology, created_at DESC, id DESC);

-- session_logs --------------------------------------------------------------

ALTER TABLE session_logs ADD COLUMN project_id uuid;
UPDATE session_logs l SET project_id = s.project_id FROM sessions s WHERE s.id = l.session_id;
-- An entry whose session is gone (only possible with foreign keys off; the
-- integrity check reports those) keeps a project too.
UPDATE session_logs SET project_id = (SELECT id FROM projects WHERE slug = 'default')
 WHERE project_id IS NULL;
ALTER TABLE session_logs ALTER COLUMN project_id SET NOT NULL;
ALTER TABLE session_logs
    ADD CONSTRAINT session_logs_project_id_fkey
        FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE;
ALTER TABLE session_logs DROP CONSTRAINT session_logs_session_id_fkey;
ALTER TABLE session_logs
    ADD CONSTRAINT session_logs_project_id_session_id_fkey
        FOREIGN KEY (project_id, session_id) REFERENCES sessions (project_id, id)
        ON DELETE CASCADE;

-- One entry per position of a session; also the keyset index of
-- ListSessionLogs and of watch catch-up reads (by session, in sequence
-- order), now leading with the project every read names.
ALTER TABLE session_logs DROP CONSTRAINT session_logs_session_seq_key;
ALTER TABLE session_logs
    ADD CONSTRAINT session_logs_project_session_seq_key UNIQUE (project_id, session_id, seq);

-- results -------------------------------------------------------------------

ALTER TABLE results ADD COLUMN project_id uuid;
UPDATE results r SET project_id = s.project_id FROM sessions s WHERE s.id = r.session_id;
UPDATE results SET project_id = (SELECT id FROM projects WHERE slug = 'default')
 WHERE project_id IS NULL;
ALTER TABLE results ALTER COLUMN project_id SET NOT NULL;
ALTER TABLE results
    ADD CONSTRAINT results_project_id_fkey
        FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE;
ALTER TABLE results DROP CONSTRAINT results_session_id_fkey;
ALTER TABLE results
    ADD CONSTRAINT results_project_id_session_id_fkey
        FOREIGN KEY (project_id, session_id) REFERENCES sessions (project_id, id)
        ON DELETE CASCADE;

-- RecordResult's idempotency key stays unique per session, and a session
-- is in one project: the key now names the project too, so the replay
-- lookup (project, session, request_id) is one index probe. The primary key
-- (session_id, id) stays: discrepancies reference it (a discrepancy sits in
-- its session's project, so its result does too).
ALTER TABLE results DROP CONSTRAINT results_session_id_request_id_key;
ALTER TABLE results
    ADD CONSTRAINT results_project_session_request_id_key
        UNIQUE (project_id, session_id, request_id);

-- GetResult by id, and ListResults newest first by session or across
-- sessions, within the project.
DROP INDEX results_id_idx;
DROP INDEX results_session_created_idx;
DROP INDEX results_created_idx;
CREATE INDEX results_project_id_idx ON results (project_id, id);
CREATE INDEX results_project_session_created_idx
    ON results (project_id, session_id, created_at DESC, id DESC);
CREATE INDEX results_project_created_idx ON results (project_id, created_at DESC, id DESC);
