-- GetTestStatistics at scale (issues 16 and 18).
--
-- 1. Executions carry labels (the labels migration V21 adds the same column;
--    IF NOT EXISTS lets either run first).
-- 2. test_execution_days: per project, test case and UTC day, the counts by
--    status, the total duration and a log-bucket duration histogram of the
--    executions that ran (not skipped). It always equals the aggregate of
--    the raw rows: the gateway refreshes the days a batch of executions
--    touches in the batch's own transaction (lock the day rows, then
--    recount them from the raw rows), and a statement trigger refreshes the
--    days of deleted executions (DeleteTestCase, DeleteSession, cleanup,
--    cascades). Executions are never updated in status, time, duration or
--    test case; a statement that did so would have to refresh their days too.

-- The backfill below reads every execution once: at 5M rows it takes
-- minutes, longer than the gateway's statement timeout.
SET LOCAL statement_timeout = 0;

ALTER TABLE test_executions ADD COLUMN IF NOT EXISTS labels jsonb NOT NULL DEFAULT '{}'::jsonb;
CREATE INDEX IF NOT EXISTS test_executions_labels_idx ON test_executions USING gin (labels);

-- The histogram bucket of a duration: 0 for 0 ms, else 1 + floor(8 log2 d),
-- so bucket b ≥ 1 holds [2^((b-1)/8), 2^(b/8)) ms: each bucket spans a
-- factor 2^(1/8) ≈ 1.09, and its geometric middle is within 4.5 % of every
-- value in it.
CREATE FUNCTION verdict_duration_bucket(duration_ms bigint) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN duration_ms <= 0 THEN 0
                ELSE 1 + floor(8 * ln(duration_ms::float8) / ln(2::float8))::int END::smallint
$$;

CREATE TABLE test_execution_days (
    project_id   uuid     NOT NULL,
    test_case_id uuid     NOT NULL,
    -- The UTC day of started_at.
    day          date     NOT NULL,
    total        bigint   NOT NULL DEFAULT 0,
    passed       bigint   NOT NULL DEFAULT 0,
    failed       bigint   NOT NULL DEFAULT 0,
    skipped      bigint   NOT NULL DEFAULT 0,
    error        bigint   NOT NULL DEFAULT 0,
    -- Sum of duration_ms of the executions that ran (not skipped).
    duration_ms  bigint   NOT NULL DEFAULT 0,
    -- Sparse histogram of the durations that ran: bucket numbers
    -- (verdict_duration_bucket, ascending) and their counts.
    hist_buckets smallint[] NOT NULL DEFAULT '{}',
    hist_counts  bigint[]   NOT NULL DEFAULT '{}',
    PRIMARY KEY (project_id, test_case_id, day),
    FOREIGN KEY (project_id, test_case_id) REFERENCES test_cases (project_id, id)
        ON DELETE CASCADE
);

-- Whole-project statistics read a range of days.
CREATE INDEX test_execution_days_project_day_idx ON test_execution_days (project_id, day);

-- The aggregate of the raw executions of each (project, test case, day)
-- named by the three arrays, one row per key (zeros when none remain), in
-- the snapshot of the calling statement.
CREATE FUNCTION verdict_execution_days_of(projects uuid[], test_cases uuid[], days date[])
RETURNS TABLE (project_id uuid, test_case_id uuid, day date, total bigint, passed bigint,
               failed bigint, skipped bigint, error bigint, duration_ms bigint,
               hist_buckets smallint[], hist_counts bigint[])
LANGUAGE sql STABLE
AS $$
    SELECT k.project_id, k.test_case_id, k.day, a.total, a.passed, a.failed, a.skipped,
           a.error, a.duration_ms, h.buckets, h.counts
    FROM unnest(projects, test_cases, days) AS k(project_id, test_case_id, day)
    CROSS JOIN LATERAL (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE e.status = 'passed') AS passed,
               count(*) FILTER (WHERE e.status = 'failed') AS failed,
               count(*) FILTER (WHERE e.status = 'skipped') AS skipped,
               count(*) FILTER (WHERE e.status = 'error') AS error,
               coalesce(sum(e.duration_ms) FILTER (WHERE e.status <> 'skipped'), 0)::bigint
                   AS duration_ms
        FROM test_executions e
        WHERE e.project_id = k.project_id AND e.test_case_id = k.test_case_id
          AND e.started_at >= k.day::timestamp AT TIME ZONE 'UTC'
          AND e.started_at < (k.day + 1)::timestamp AT TIME ZONE 'UTC') a
    CROSS JOIN LATERAL (
        SELECT coalesce(array_agg(b.bucket ORDER BY b.bucket), '{}') AS buckets,
               coalesce(array_agg(b.n ORDER BY b.bucket), '{}') AS counts
        FROM (SELECT verdict_duration_bucket(e.duration_ms) AS bucket, count(*) AS n
              FROM test_executions e
              WHERE e.project_id = k.project_id AND e.test_case_id = k.test_case_id
                AND e.started_at >= k.day::timestamp AT TIME ZONE 'UTC'
                AND e.started_at < (k.day + 1)::timestamp AT TIME ZONE 'UTC'
                AND e.status <> 'skipped'
              GROUP BY 1) b) h
$$;

-- After executions are deleted: lock the day rows they counted (in key
-- order, as the write path does), recount them from the remaining rows
-- (a new snapshot: this sees whatever concurrent writers committed while
-- we waited) and drop the days left empty. Only existing rows are touched,
-- so a cascade from a deleted test case or project never re-creates one.
CREATE FUNCTION verdict_execution_days_after_delete() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    ps uuid[];
    ts uuid[];
    ds date[];
BEGIN
    SELECT array_agg(g.project_id ORDER BY g.project_id, g.test_case_id, g.day),
           array_agg(g.test_case_id ORDER BY g.project_id, g.test_case_id, g.day),
           array_agg(g.day ORDER BY g.project_id, g.test_case_id, g.day)
    INTO ps, ts, ds
    FROM (SELECT DISTINCT o.project_id, o.test_case_id,
                 (o.started_at AT TIME ZONE 'UTC')::date AS day
          FROM gone o) g;
    IF ps IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM test_execution_days d
        JOIN unnest(ps, ts, ds) AS k(project_id, test_case_id, day)
          ON d.project_id = k.project_id AND d.test_case_id = k.test_case_id AND d.day = k.day
        ORDER BY d.project_id, d.test_case_id, d.day
        FOR UPDATE OF d;
    UPDATE test_execution_days d
       SET total = a.total, passed = a.passed, failed = a.failed, skipped = a.skipped,
           error = a.error, duration_ms = a.duration_ms,
           hist_buckets = a.hist_buckets, hist_counts = a.hist_counts
      FROM verdict_execution_days_of(ps, ts, ds) a
     WHERE d.project_id = a.project_id AND d.test_case_id = a.test_case_id AND d.day = a.day;
    DELETE FROM test_execution_days d
     USING unnest(ps, ts, ds) AS k(project_id, test_case_id, day)
     WHERE d.project_id = k.project_id AND d.test_case_id = k.test_case_id AND d.day = k.day
       AND d.total = 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER test_executions_refresh_days
    AFTER DELETE ON test_executions
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION verdict_execution_days_after_delete();

-- Backfill from the rows stored so far.
INSERT INTO test_execution_days (project_id, test_case_id, day, total, passed, failed,
                                 skipped, error, duration_ms, hist_buckets, hist_counts)
SELECT a.project_id, a.test_case_id, a.day, a.total, a.passed, a.failed, a.skipped, a.error,
       a.duration_ms, coalesce(h.buckets, '{}'), coalesce(h.counts, '{}')
FROM (SELECT project_id, test_case_id, (started_at AT TIME ZONE 'UTC')::date AS day,
             count(*) AS total,
             count(*) FILTER (WHERE status = 'passed') AS passed,
             count(*) FILTER (WHERE status = 'failed') AS failed,
             count(*) FILTER (WHERE status = 'skipped') AS skipped,
             count(*) FILTER (WHERE status = 'error') AS error,
             coalesce(sum(duration_ms) FILTER (WHERE status <> 'skipped'), 0)::bigint
                 AS duration_ms
      FROM test_executions GROUP BY 1, 2, 3) a
LEFT JOIN (SELECT project_id, test_case_id, day,
                  array_agg(bucket ORDER BY bucket) AS buckets,
                  array_agg(n ORDER BY bucket) AS counts
           FROM (SELECT project_id, test_case_id,
                        (started_at AT TIME ZONE 'UTC')::date AS day,
                        verdict_duration_bucket(duration_ms) AS bucket, count(*) AS n
                 FROM test_executions WHERE status <> 'skipped'
                 GROUP BY 1, 2, 3, 4) b
           GROUP BY 1, 2, 3) h
  ON h.project_id = a.project_id AND h.test_case_id = a.test_case_id AND h.day = a.day;

-- Run-scoped statistics read the executions of a run by test case and
-- attempt; the index of V20 serves that. Label-scoped ones use the GIN
-- index above.
