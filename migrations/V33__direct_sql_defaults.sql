-- Direct-SQL writers that predate projects keep working: an INSERT into
-- sessions, session_logs or audit_events that leaves `project_id` out lands in
-- the `default` project (the same place a gateway call that names no project
-- lands), and a session_logs INSERT that leaves `seq` out still gets the next
-- position of its session under the session row's lock.
--
-- The gateway itself always names the project and always sets `seq` (it
-- takes the position with the same UPDATE … RETURNING, in the same
-- transaction), so neither the default nor the trigger below ever acts on its
-- statements. The composite foreign key of session_logs
-- (project_id, session_id) → sessions (project_id, id) still refuses a child
-- that would land in another project than its parent: a raw log row for a
-- session of project `team-a` that leaves `project_id` out gets `default` and
-- fails that key, it never crosses projects silently.

-- The `default` project's id. STABLE (one lookup per statement, not per row;
-- the row cannot be deleted or renamed: V14 and the projects service refuse
-- both), SQL so the planner can inline it, and qualified so that a caller's
-- search_path cannot swap the table.
CREATE FUNCTION verdict_default_project_id() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT id FROM public.projects WHERE slug = 'default'
$$;

ALTER TABLE sessions ALTER COLUMN project_id SET DEFAULT verdict_default_project_id();
ALTER TABLE session_logs ALTER COLUMN project_id SET DEFAULT verdict_default_project_id();
ALTER TABLE audit_events ALTER COLUMN project_id SET DEFAULT verdict_default_project_id();

-- session_logs.seq for writers that leave it out. The V10 trigger ran its
-- function for every row, the gateway's included, and then did nothing for
-- them; with WHEN (NEW.seq IS NULL) PostgreSQL skips the function call
-- entirely when `seq` is given. The position is taken from the session row of
-- the row's own project (defaults are applied before BEFORE triggers run, so
-- NEW.project_id is already set), exactly as the gateway's
-- `UPDATE sessions SET log_seq = log_seq + 1 … RETURNING`: the row lock
-- serialises concurrent writers, and a rolled-back insert rolls its increment
-- back, so positions stay gap-free in commit order. A row whose session does
-- not exist (only possible with foreign keys off) is numbered after the
-- existing rows of that session.
CREATE OR REPLACE FUNCTION verdict_session_log_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE sessions SET log_seq = log_seq + 1
     WHERE project_id = NEW.project_id AND id = NEW.session_id
     RETURNING log_seq INTO NEW.seq;
    IF NEW.seq IS NULL THEN
        SELECT COALESCE(max(seq), 0) + 1 INTO NEW.seq
          FROM session_logs
         WHERE project_id = NEW.project_id AND session_id = NEW.session_id;
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER session_logs_seq ON session_logs;
CREATE TRIGGER session_logs_seq
    BEFORE INSERT ON session_logs
    FOR EACH ROW
    WHEN (NEW.seq IS NULL)
    EXECUTE FUNCTION verdict_session_log_seq();
-- As in V10: it also fires under session_replication_role = replica.
ALTER TABLE session_logs ENABLE ALWAYS TRIGGER session_logs_seq;
