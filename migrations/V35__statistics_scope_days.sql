-- GetTestStatistics of a subsystem, a test type or the whole project read a
-- second rollup level (issue 18).
--
-- 1. test_execution_days carries the subsystem and type of its test case
--    (denormalised: a deleted test case's rows still say which scope they
--    counted in). A statement trigger on test_cases moves the rows of a test
--    case whose subsystem or type changes (statistics count the current
--    ones); the gateway reads the test case FOR SHARE when it creates a
--    day row, so a concurrent update cannot leave a row with the old scope.
-- 2. test_execution_scope_days: per project, scope and UTC day, the sums of
--    the test case day rows of that scope (counts by status, duration sum,
--    merged log-bucket histogram). Three scopes per test case day row:
--    ('project', ''), ('subsystem', its subsystem), ('test_type', its type).
--    Statement triggers on test_execution_days add each statement's change
--    (new rows minus old rows, from the transition tables) to the scope rows
--    it touches, locking them in key order (project, kind, value, day); an
--    INSERT .. ON CONFLICT DO UPDATE adds to the latest committed version of
--    the row, so concurrent writers never lose an update, whatever their
--    snapshots. Every writer locks its test case day rows first (in key
--    order) and the scope rows at the end of the statement that changed
--    them, so two writers cannot wait on each other in a cycle. Rows whose
--    counts reach zero are deleted.
--
-- 3. test_case_recent_outcomes: per test case, its last 100 passed or
--    failed executions (oldest first) as a string of 'P' and 'F' and their
--    start times. The flakiness ranking reads it instead of the executions
--    when the ranking's window ends after the newest of them and asks for
--    at most 100 (the default is 20), which a dashboard's "last N days"
--    does: one short row per test case. Refreshed like the day rows: the
--    gateway locks the rows of the test cases a batch wrote (in key order,
--    after the day and scope rows) and recomputes them from the executions
--    in a statement of its own; a statement trigger does the same for
--    deleted executions that could be among the last 100.
--
-- The backfills below read the day rows (one per test case and day, not
-- one per execution) and the last 100 index entries of each test case,
-- set-based.
SET LOCAL statement_timeout = 0;

ALTER TABLE test_execution_days
    ADD COLUMN target_subsystem text NOT NULL DEFAULT '',
    ADD COLUMN test_type        text NOT NULL DEFAULT '';

UPDATE test_execution_days d
   SET target_subsystem = t.target_subsystem, test_type = t.test_type
  FROM test_cases t
 WHERE t.project_id = d.project_id AND t.id = d.test_case_id;

CREATE TABLE test_execution_scope_days (
    project_id   uuid     NOT NULL,
    -- 'project' (value ''), 'subsystem' (value: the target subsystem, ''
    -- for none) or 'test_type' (value: the stored type name).
    kind         text     NOT NULL CHECK (kind IN ('project', 'subsystem', 'test_type')),
    value        text     NOT NULL,
    -- The UTC day of started_at.
    day          date     NOT NULL,
    total        bigint   NOT NULL DEFAULT 0,
    passed       bigint   NOT NULL DEFAULT 0,
    failed       bigint   NOT NULL DEFAULT 0,
    skipped      bigint   NOT NULL DEFAULT 0,
    error        bigint   NOT NULL DEFAULT 0,
    -- Sum of duration_ms of the executions that ran (not skipped).
    duration_ms  bigint   NOT NULL DEFAULT 0,
    -- The merged histograms of the day rows (buckets ascending, counts).
    hist_buckets smallint[] NOT NULL DEFAULT '{}',
    hist_counts  bigint[]   NOT NULL DEFAULT '{}',
    PRIMARY KEY (project_id, kind, value, day)
);

-- The sum of two sparse histograms (buckets ascending); buckets whose
-- count sums to zero are left out.
CREATE FUNCTION verdict_hist_add(b1 smallint[], c1 bigint[], b2 smallint[], c2 bigint[],
                                 OUT buckets smallint[], OUT counts bigint[])
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT coalesce(array_agg(x.b ORDER BY x.b), '{}'), coalesce(array_agg(x.n ORDER BY x.b), '{}')
    FROM (SELECT h.b, sum(h.n)::bigint AS n
          FROM (SELECT * FROM unnest(b1, c1) UNION ALL SELECT * FROM unnest(b2, c2)) AS h(b, n)
          GROUP BY h.b HAVING sum(h.n) <> 0) x
$$;

-- Adds (new rows) minus (old rows) of test_execution_days to the scope
-- rows. One function for the three triggers: the transition tables are
-- named changed_new / changed_old in each, and only the ones the event has
-- are read.
CREATE FUNCTION verdict_scope_days_apply() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    news test_execution_days[] := '{}';
    olds test_execution_days[] := '{}';
    zp uuid[];
    zk text[];
    zv text[];
    zd date[];
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT coalesce(array_agg(n), '{}') INTO news FROM changed_new n;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        SELECT coalesce(array_agg(o), '{}') INTO olds FROM changed_old o;
    END IF;
    WITH changed AS (
        SELECT 1 AS sign, n.* FROM unnest(news) n
        UNION ALL
        SELECT -1 AS sign, o.* FROM unnest(olds) o),
    keyed AS (
        SELECT c.project_id, k.kind, k.value, c.day, c.sign, c.total, c.passed, c.failed,
               c.skipped, c.error, c.duration_ms, c.hist_buckets, c.hist_counts
        FROM changed c
        CROSS JOIN LATERAL (VALUES ('project', ''), ('subsystem', c.target_subsystem),
                                   ('test_type', c.test_type)) AS k(kind, value)),
    sums AS (
        SELECT project_id, kind, value, day,
               sum(sign * total)::bigint AS total, sum(sign * passed)::bigint AS passed,
               sum(sign * failed)::bigint AS failed, sum(sign * skipped)::bigint AS skipped,
               sum(sign * error)::bigint AS error, sum(sign * duration_ms)::bigint AS duration_ms
        FROM keyed GROUP BY project_id, kind, value, day),
    hist AS (
        SELECT project_id, kind, value, day,
               array_agg(b ORDER BY b) AS buckets, array_agg(n ORDER BY b) AS counts
        FROM (SELECT x.project_id, x.kind, x.value, x.day, h.b, sum(x.sign * h.n)::bigint AS n
              FROM keyed x CROSS JOIN LATERAL unnest(x.hist_buckets, x.hist_counts) AS h(b, n)
              GROUP BY x.project_id, x.kind, x.value, x.day, h.b
              HAVING sum(x.sign * h.n) <> 0) y
        GROUP BY project_id, kind, value, day),
    delta AS (
        SELECT s.project_id, s.kind, s.value, s.day, s.total, s.passed, s.failed, s.skipped,
               s.error, s.duration_ms, coalesce(h.buckets, '{}') AS buckets,
               coalesce(h.counts, '{}') AS counts
        FROM sums s
        LEFT JOIN hist h ON h.project_id = s.project_id AND h.kind = s.kind
                        AND h.value = s.value AND h.day = s.day
        WHERE s.total <> 0 OR s.passed <> 0 OR s.failed <> 0 OR s.skipped <> 0
           OR s.error <> 0 OR s.duration_ms <> 0 OR h.buckets IS NOT NULL),
    applied AS (
        INSERT INTO test_execution_scope_days AS r
            (project_id, kind, value, day, total, passed, failed, skipped, error, duration_ms,
             hist_buckets, hist_counts)
        SELECT d.project_id, d.kind, d.value, d.day, d.total, d.passed, d.failed, d.skipped,
               d.error, d.duration_ms, d.buckets, d.counts
        FROM delta d
        ORDER BY d.project_id, d.kind, d.value, d.day
        ON CONFLICT (project_id, kind, value, day) DO UPDATE
           SET total = r.total + excluded.total, passed = r.passed + excluded.passed,
               failed = r.failed + excluded.failed, skipped = r.skipped + excluded.skipped,
               error = r.error + excluded.error,
               duration_ms = r.duration_ms + excluded.duration_ms,
               (hist_buckets, hist_counts) =
                   (SELECT m.buckets, m.counts
                    FROM verdict_hist_add(r.hist_buckets, r.hist_counts,
                                          excluded.hist_buckets, excluded.hist_counts) m)
        RETURNING r.project_id, r.kind, r.value, r.day, r.total)
    SELECT array_agg(a.project_id), array_agg(a.kind), array_agg(a.value), array_agg(a.day)
      INTO zp, zk, zv, zd
      FROM applied a WHERE a.total = 0;
    IF zp IS NOT NULL THEN
        DELETE FROM test_execution_scope_days r
         USING unnest(zp, zk, zv, zd) AS z(project_id, kind, value, day)
         WHERE r.project_id = z.project_id AND r.kind = z.kind AND r.value = z.value
           AND r.day = z.day AND r.total = 0;
    END IF;
    RETURN NULL;
END
$$;

-- Backfill from the day rows stored so far.
INSERT INTO test_execution_scope_days (project_id, kind, value, day, total, passed, failed,
                                       skipped, error, duration_ms, hist_buckets, hist_counts)
SELECT s.project_id, s.kind, s.value, s.day, s.total, s.passed, s.failed, s.skipped, s.error,
       s.duration_ms, coalesce(h.buckets, '{}'), coalesce(h.counts, '{}')
FROM (SELECT d.project_id, k.kind, k.value, d.day, sum(d.total)::bigint AS total,
             sum(d.passed)::bigint AS passed, sum(d.failed)::bigint AS failed,
             sum(d.skipped)::bigint AS skipped, sum(d.error)::bigint AS error,
             sum(d.duration_ms)::bigint AS duration_ms
      FROM test_execution_days d
      CROSS JOIN LATERAL (VALUES ('project', ''), ('subsystem', d.target_subsystem),
                                 ('test_type', d.test_type)) AS k(kind, value)
      GROUP BY 1, 2, 3, 4) s
LEFT JOIN (SELECT project_id, kind, value, day,
                  array_agg(b ORDER BY b) AS buckets, array_agg(n ORDER BY b) AS counts
           FROM (SELECT d.project_id, k.kind, k.value, d.day, h.b, sum(h.n)::bigint AS n
                 FROM test_execution_days d
                 CROSS JOIN LATERAL (VALUES ('project', ''), ('subsystem', d.target_subsystem),
                                            ('test_type', d.test_type)) AS k(kind, value)
                 CROSS JOIN LATERAL unnest(d.hist_buckets, d.hist_counts) AS h(b, n)
                 GROUP BY 1, 2, 3, 4, 5) y
           GROUP BY 1, 2, 3, 4) h
  ON h.project_id = s.project_id AND h.kind = s.kind AND h.value = s.value AND h.day = s.day
WHERE s.total <> 0;

CREATE TRIGGER test_execution_days_scope_insert
    AFTER INSERT ON test_execution_days
    REFERENCING NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION verdict_scope_days_apply();
CREATE TRIGGER test_execution_days_scope_update
    AFTER UPDATE ON test_execution_days
    REFERENCING OLD TABLE AS changed_old NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION verdict_scope_days_apply();
CREATE TRIGGER test_execution_days_scope_delete
    AFTER DELETE ON test_execution_days
    REFERENCING OLD TABLE AS changed_old
    FOR EACH STATEMENT EXECUTE FUNCTION verdict_scope_days_apply();

-- A test case whose subsystem or type changed: its day rows move to the
-- new scopes (the trigger above subtracts them from the old ones), locked
-- in key order.
CREATE FUNCTION verdict_execution_days_rescope() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM 1 FROM test_execution_days d
        JOIN changed_new n ON d.project_id = n.project_id AND d.test_case_id = n.id
       WHERE d.target_subsystem <> n.target_subsystem OR d.test_type <> n.test_type
       ORDER BY d.project_id, d.test_case_id, d.day
         FOR UPDATE OF d;
    UPDATE test_execution_days d
       SET target_subsystem = n.target_subsystem, test_type = n.test_type
      FROM changed_new n
     WHERE d.project_id = n.project_id AND d.test_case_id = n.id
       AND (d.target_subsystem <> n.target_subsystem OR d.test_type <> n.test_type);
    RETURN NULL;
END
$$;

CREATE TRIGGER test_cases_rescope_execution_days
    AFTER UPDATE ON test_cases
    REFERENCING NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION verdict_execution_days_rescope();

-- The flakiness ranking reads, per test case in scope, its last N passed
-- or failed executions newest first: with the status in the index that is
-- an index-only scan (one or two leaf pages per test case instead of one
-- heap page per execution); the exact percentiles of small scopes read the
-- duration from it too. Same key as the index it replaces (ListExecutions
-- by test case, DeleteTestCase's existence check and the foreign key's
-- cascade keep using it).
CREATE INDEX test_executions_project_case_recent_idx
    ON test_executions (project_id, test_case_id, started_at DESC, id DESC)
    INCLUDE (status, duration_ms);
DROP INDEX test_executions_project_case_started_idx;

CREATE TABLE test_case_recent_outcomes (
    project_id   uuid          NOT NULL,
    test_case_id uuid          NOT NULL,
    -- The last 100 passed ('P') or failed ('F') executions, oldest first
    -- (by started_at, then id).
    outcomes     text          NOT NULL DEFAULT '',
    -- Their started_at, in the same order.
    times        timestamptz[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (project_id, test_case_id),
    FOREIGN KEY (project_id, test_case_id) REFERENCES test_cases (project_id, id)
        ON DELETE CASCADE
);

-- The last 100 passed or failed executions of a test case, from the index
-- above (index-only), in the snapshot of the calling statement.
CREATE FUNCTION verdict_recent_outcomes_of(project uuid, test_case uuid,
                                           OUT outcomes text, OUT times timestamptz[])
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(string_agg(CASE WHEN x.status = 'passed' THEN 'P' ELSE 'F' END, ''
                               ORDER BY x.started_at, x.id), ''),
           coalesce(array_agg(x.started_at ORDER BY x.started_at, x.id), '{}')
    FROM (SELECT e.status, e.started_at, e.id FROM test_executions e
          WHERE e.project_id = project AND e.test_case_id = test_case
            AND e.status IN ('passed', 'failed')
          ORDER BY e.started_at DESC, e.id DESC LIMIT 100) x
$$;

INSERT INTO test_case_recent_outcomes (project_id, test_case_id, outcomes, times)
SELECT t.project_id, t.id, r.outcomes, r.times
FROM test_cases t CROSS JOIN LATERAL verdict_recent_outcomes_of(t.project_id, t.id) r;

-- After executions are deleted: the test cases whose deleted passed or
-- failed executions could be among their last 100 (not strictly older
-- than the oldest kept of a full row) are locked in key order and
-- recomputed from the remaining rows (a new snapshot). Only existing rows
-- are updated, so a cascade from a deleted test case never re-creates one.
CREATE FUNCTION verdict_recent_outcomes_after_delete() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    ps uuid[];
    ts uuid[];
BEGIN
    SELECT array_agg(g.project_id ORDER BY g.project_id, g.test_case_id),
           array_agg(g.test_case_id ORDER BY g.project_id, g.test_case_id)
    INTO ps, ts
    FROM (SELECT o.project_id, o.test_case_id, max(o.started_at) AS newest
          FROM gone o WHERE o.status IN ('passed', 'failed')
          GROUP BY o.project_id, o.test_case_id) g
    JOIN test_case_recent_outcomes r
      ON r.project_id = g.project_id AND r.test_case_id = g.test_case_id
    WHERE cardinality(r.times) < 100 OR g.newest >= r.times[1];
    IF ps IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM test_case_recent_outcomes r
        JOIN unnest(ps, ts) AS k(project_id, test_case_id)
          ON r.project_id = k.project_id AND r.test_case_id = k.test_case_id
        ORDER BY r.project_id, r.test_case_id
        FOR UPDATE OF r;
    UPDATE test_case_recent_outcomes r
       SET outcomes = a.outcomes, times = a.times
      FROM unnest(ps, ts) AS k(project_id, test_case_id)
      CROSS JOIN LATERAL verdict_recent_outcomes_of(k.project_id, k.test_case_id) a
     WHERE r.project_id = k.project_id AND r.test_case_id = k.test_case_id;
    RETURN NULL;
END
$$;

-- Named to fire after test_executions_refresh_days (triggers of one event
-- fire in name order): day rows, then scope rows, then these.
CREATE TRIGGER test_executions_refresh_recent
    AFTER DELETE ON test_executions
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION verdict_recent_outcomes_after_delete();
