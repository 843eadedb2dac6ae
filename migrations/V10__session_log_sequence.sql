-- A per-session log sequence that commits cannot overtake.
--
-- `session_logs.id` is an identity value: it is taken when the INSERT runs,
-- not when its transaction commits, so an entry with a lower id can become
-- visible after one with a higher id was read. A watcher (or any reader)
-- following `id > last seen` then skips it forever.
--
-- `seq` numbers the entries of one session 1, 2, 3, … and is assigned from
-- `sessions.log_seq` by `UPDATE sessions SET log_seq = log_seq + 1 … RETURNING`
-- in the appending transaction. That UPDATE holds the session row's lock until
-- commit, so appends to one session (and status moves, which lock the same
-- row) commit one at a time in `seq` order, without gaps (a rolled-back
-- append also rolls back its increment). Reading `seq > last seen` is
-- therefore complete, and `sessions.log_seq` read together with the status
-- says exactly which entries were committed before that status.

-- The last `seq` handed out for the session's log (0: no entry yet).
ALTER TABLE sessions ADD COLUMN log_seq bigint NOT NULL DEFAULT 0;

-- The `log_seq` at the moment the session's current state (its `version`)
-- was committed: entries with `seq <= state_log_seq` committed before that
-- state, the others after it. A watcher uses it to place a state change
-- exactly between the log entries around it.
ALTER TABLE sessions ADD COLUMN state_log_seq bigint NOT NULL DEFAULT 0;

ALTER TABLE session_logs ADD COLUMN seq bigint;

-- Existing entries keep their order: numbered per session in id order.
UPDATE session_logs l
   SET seq = n.seq
  FROM (SELECT session_id, id,
               row_number() OVER (PARTITION BY session_id ORDER BY id) AS seq
          FROM session_logs) n
 WHERE l.session_id = n.session_id AND l.id = n.id;

UPDATE sessions s
   SET log_seq = n.last, state_log_seq = n.last
  FROM (SELECT session_id, max(seq) AS last FROM session_logs GROUP BY session_id) n
 WHERE s.id = n.session_id;

ALTER TABLE session_logs ALTER COLUMN seq SET NOT NULL;

-- One entry per position; also the keyset index of ListSessionLogs and of
-- watch catch-up reads (by session, in sequence order).
ALTER TABLE session_logs
    ADD CONSTRAINT session_logs_session_seq_key UNIQUE (session_id, seq);

-- Every change of a session's state bumps its version (see V1); whichever
-- statement does it, the state is then placed after the entries committed so
-- far. Appends only move `log_seq` and leave `state_log_seq` alone.
CREATE FUNCTION verdict_session_state_log_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.state_log_seq := NEW.log_seq;
    RETURN NEW;
END;
$$;

CREATE TRIGGER sessions_state_log_seq
    BEFORE UPDATE ON sessions
    FOR EACH ROW
    WHEN (NEW.version IS DISTINCT FROM OLD.version)
    EXECUTE FUNCTION verdict_session_state_log_seq();

-- The gateway's AppendSessionLog takes the position itself (it also refuses
-- final sessions and returns the position). Any other writer — an operator's
-- SQL, a bulk load, a test planting rows — that leaves `seq` out gets the
-- next position the same way, under the session row's lock, so the order
-- stays one that commits cannot overtake. A row whose session does not exist
-- (only possible with foreign keys off) is numbered after the existing rows
-- of that id. ENABLE ALWAYS: it fires under session_replication_role =
-- replica too, where plain triggers (and foreign keys) are off, so no insert
-- can leave `seq` empty.
CREATE FUNCTION verdict_session_log_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq IS NULL THEN
        UPDATE sessions SET log_seq = log_seq + 1
         WHERE id = NEW.session_id
         RETURNING log_seq INTO NEW.seq;
        IF NEW.seq IS NULL THEN
            SELECT COALESCE(max(seq), 0) + 1 INTO NEW.seq
              FROM session_logs WHERE session_id = NEW.session_id;
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER session_logs_seq
    BEFORE INSERT ON session_logs
    FOR EACH ROW EXECUTE FUNCTION verdict_session_log_seq();
ALTER TABLE session_logs ENABLE ALWAYS TRIGGER session_logs_seq;
