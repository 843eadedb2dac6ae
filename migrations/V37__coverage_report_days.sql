-- Coverage reports per project, UTC day of recorded_at, branch and
-- subsystem, maintained at write time (issue 18): GetCoverageTrend and
-- GetAggregateCoverage without a label filter read these rows (one per
-- branch, subsystem and day that has a report) instead of every report.
--
-- Each row holds the number of reports, the sums of their six counters
-- (numeric: exact) and the latest report of the day (by recorded_at, then
-- id, as the trend picks it) with its counters. The latest report of a
-- week, or of all time, per branch and subsystem is the latest of the
-- days' latest.
--
-- Kept by statement-level triggers on coverage_reports in the writing
-- statement's transaction:
--   INSERT adds the new reports' counts and sums and keeps the later of the
--   stored and the new latest (commutative: concurrent inserts of one key
--   serialise on its row and each adds its own reports).
--   DELETE and UPDATE lock the rows of the keys they touch (in key order,
--   existing rows only), then recompute those rows from the remaining
--   reports in a new snapshot (which sees what concurrent writers committed
--   while it waited), and drop keys left without a report.
-- Reports never change once recorded; the UPDATE trigger is there so an
-- administrative UPDATE cannot leave the rows stale.

-- The backfill reads every report once.
SET LOCAL statement_timeout = 0;

CREATE TABLE coverage_report_days (
    project_id                uuid        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    -- The UTC day of recorded_at.
    day                       date        NOT NULL,
    branch                    text        NOT NULL,
    subsystem                 text        NOT NULL,
    report_count              bigint      NOT NULL,
    lines_covered             numeric     NOT NULL,
    lines_total               numeric     NOT NULL,
    branches_covered          numeric     NOT NULL,
    branches_total            numeric     NOT NULL,
    functions_covered         numeric     NOT NULL,
    functions_total           numeric     NOT NULL,
    latest_id                 uuid        NOT NULL,
    latest_recorded_at        timestamptz NOT NULL,
    latest_lines_covered      bigint      NOT NULL,
    latest_lines_total        bigint      NOT NULL,
    latest_branches_covered   bigint      NOT NULL,
    latest_branches_total     bigint      NOT NULL,
    latest_functions_covered  bigint      NOT NULL,
    latest_functions_total    bigint      NOT NULL,
    PRIMARY KEY (project_id, day, branch, subsystem)
);
-- Trends and aggregates of one branch (and subsystem).
CREATE INDEX coverage_report_days_branch_idx
    ON coverage_report_days (project_id, branch, subsystem, day);
-- Aggregates of one subsystem.
CREATE INDEX coverage_report_days_subsystem_idx
    ON coverage_report_days (project_id, subsystem, day);

CREATE FUNCTION coverage_report_days_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO coverage_report_days AS c
        (project_id, day, branch, subsystem, report_count, lines_covered, lines_total,
         branches_covered, branches_total, functions_covered, functions_total,
         latest_id, latest_recorded_at, latest_lines_covered, latest_lines_total,
         latest_branches_covered, latest_branches_total, latest_functions_covered,
         latest_functions_total)
    SELECT a.project_id, a.day, a.branch, a.subsystem, a.n, a.lc, a.lt, a.bc, a.bt, a.fc, a.ft,
           l.id, l.recorded_at, l.lines_covered, l.lines_total, l.branches_covered,
           l.branches_total, l.functions_covered, l.functions_total
    FROM (SELECT r.project_id, (r.recorded_at AT TIME ZONE 'UTC')::date AS day, r.branch,
                 r.subsystem, count(*) AS n, sum(r.lines_covered) AS lc,
                 sum(r.lines_total) AS lt, sum(r.branches_covered) AS bc,
                 sum(r.branches_total) AS bt, sum(r.functions_covered) AS fc,
                 sum(r.functions_total) AS ft
          FROM new_rows r GROUP BY 1, 2, 3, 4) a
    JOIN (SELECT DISTINCT ON (r.project_id, (r.recorded_at AT TIME ZONE 'UTC')::date, r.branch,
                              r.subsystem)
                 r.project_id, (r.recorded_at AT TIME ZONE 'UTC')::date AS day, r.branch,
                 r.subsystem, r.id, r.recorded_at, r.lines_covered, r.lines_total,
                 r.branches_covered, r.branches_total, r.functions_covered, r.functions_total
          FROM new_rows r
          ORDER BY r.project_id, (r.recorded_at AT TIME ZONE 'UTC')::date, r.branch, r.subsystem,
                   r.recorded_at DESC, r.id DESC) l
      ON l.project_id = a.project_id AND l.day = a.day AND l.branch = a.branch
     AND l.subsystem = a.subsystem
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (project_id, day, branch, subsystem) DO UPDATE SET
        report_count = c.report_count + EXCLUDED.report_count,
        lines_covered = c.lines_covered + EXCLUDED.lines_covered,
        lines_total = c.lines_total + EXCLUDED.lines_total,
        branches_covered = c.branches_covered + EXCLUDED.branches_covered,
        branches_total = c.branches_total + EXCLUDED.branches_total,
        functions_covered = c.functions_covered + EXCLUDED.functions_covered,
        functions_total = c.functions_total + EXCLUDED.functions_total,
        (latest_id, latest_recorded_at, latest_lines_covered, latest_lines_total,
         latest_branches_covered, latest_branches_total, latest_functions_covered,
         latest_functions_total) =
        (SELECT x.* FROM (VALUES
            (c.latest_id, c.latest_recorded_at, c.latest_lines_covered, c.latest_lines_total,
             c.latest_branches_covered, c.latest_branches_total, c.latest_functions_covered,
             c.latest_functions_total),
            (EXCLUDED.latest_id, EXCLUDED.latest_recorded_at, EXCLUDED.latest_lines_covered,
             EXCLUDED.latest_lines_total, EXCLUDED.latest_branches_covered,
             EXCLUDED.latest_branches_total, EXCLUDED.latest_functions_covered,
             EXCLUDED.latest_functions_total)) AS x
         ORDER BY x.column2 DESC, x.column1 DESC LIMIT 1);
    RETURN NULL;
END
$$;

-- Recomputes the rows of the keys named by the four arrays from the stored
-- reports (see above), in key order.
CREATE FUNCTION coverage_report_days_refresh(
    p_project uuid[], p_day date[], p_branch text[], p_subsystem text[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM coverage_report_days d
        JOIN (SELECT DISTINCT * FROM unnest(p_project, p_day, p_branch, p_subsystem)
                  AS u(project_id, day, branch, subsystem)) k
          ON d.project_id = k.project_id AND d.day = k.day AND d.branch = k.branch
         AND d.subsystem = k.subsystem
        ORDER BY d.project_id, d.day, d.branch, d.subsystem
        FOR UPDATE OF d;
    INSERT INTO coverage_report_days AS c
        (project_id, day, branch, subsystem, report_count, lines_covered, lines_total,
         branches_covered, branches_total, functions_covered, functions_total,
         latest_id, latest_recorded_at, latest_lines_covered, latest_lines_total,
         latest_branches_covered, latest_branches_total, latest_functions_covered,
         latest_functions_total)
    SELECT k.project_id, k.day, k.branch, k.subsystem, a.n, a.lc, a.lt, a.bc, a.bt, a.fc, a.ft,
           l.id, l.recorded_at, l.lines_covered, l.lines_total, l.branches_covered,
           l.branches_total, l.functions_covered, l.functions_total
    FROM (SELECT DISTINCT * FROM unnest(p_project, p_day, p_branch, p_subsystem)
              AS u(project_id, day, branch, subsystem)) k
    CROSS JOIN LATERAL (
        SELECT count(*) AS n, sum(r.lines_covered) AS lc, sum(r.lines_total) AS lt,
               sum(r.branches_covered) AS bc, sum(r.branches_total) AS bt,
               sum(r.functions_covered) AS fc, sum(r.functions_total) AS ft
        FROM coverage_reports r
        WHERE r.project_id = k.project_id AND r.branch = k.branch AND r.subsystem = k.subsystem
          AND r.recorded_at >= k.day::timestamp AT TIME ZONE 'UTC'
          AND r.recorded_at < (k.day + 1)::timestamp AT TIME ZONE 'UTC') a
    CROSS JOIN LATERAL (
        SELECT r.id, r.recorded_at, r.lines_covered, r.lines_total, r.branches_covered,
               r.branches_total, r.functions_covered, r.functions_total
        FROM coverage_reports r
        WHERE r.project_id = k.project_id AND r.branch = k.branch AND r.subsystem = k.subsystem
          AND r.recorded_at >= k.day::timestamp AT TIME ZONE 'UTC'
          AND r.recorded_at < (k.day + 1)::timestamp AT TIME ZONE 'UTC'
        ORDER BY r.recorded_at DESC, r.id DESC LIMIT 1) l
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (project_id, day, branch, subsystem) DO UPDATE SET
        report_count = EXCLUDED.report_count, lines_covered = EXCLUDED.lines_covered,
        lines_total = EXCLUDED.lines_total, branches_covered = EXCLUDED.branches_covered,
        branches_total = EXCLUDED.branches_total, functions_covered = EXCLUDED.functions_covered,
        functions_total = EXCLUDED.functions_total, latest_id = EXCLUDED.latest_id,
        latest_recorded_at = EXCLUDED.latest_recorded_at,
        latest_lines_covered = EXCLUDED.latest_lines_covered,
        latest_lines_total = EXCLUDED.latest_lines_total,
        latest_branches_covered = EXCLUDED.latest_branches_covered,
        latest_branches_total = EXCLUDED.latest_branches_total,
        latest_functions_covered = EXCLUDED.latest_functions_covered,
        latest_functions_total = EXCLUDED.latest_functions_total;
    -- Keys left without a report (the locked rows; a key whose row this
    -- call did not find has nothing to drop).
    DELETE FROM coverage_report_days d
    USING unnest(p_project, p_day, p_branch, p_subsystem) AS k(project_id, day, branch, subsystem)
    WHERE d.project_id = k.project_id AND d.day = k.day AND d.branch = k.branch
      AND d.subsystem = k.subsystem
      AND NOT EXISTS (SELECT 1 FROM coverage_reports r
                      WHERE r.project_id = k.project_id AND r.branch = k.branch
                        AND r.subsystem = k.subsystem
                        AND r.recorded_at >= k.day::timestamp AT TIME ZONE 'UTC'
                        AND r.recorded_at < (k.day + 1)::timestamp AT TIME ZONE 'UTC');
END
$$;

CREATE FUNCTION coverage_report_days_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM coverage_report_days_refresh(array_agg(project_id), array_agg(day),
                                         array_agg(branch), array_agg(subsystem))
    FROM (SELECT DISTINCT o.project_id, (o.recorded_at AT TIME ZONE 'UTC')::date AS day,
                 o.branch, o.subsystem
          FROM old_rows o) k
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION coverage_report_days_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM coverage_report_days_refresh(array_agg(project_id), array_agg(day),
                                         array_agg(branch), array_agg(subsystem))
    FROM (SELECT o.project_id, (o.recorded_at AT TIME ZONE 'UTC')::date AS day,
                 o.branch, o.subsystem
          FROM old_rows o
          UNION
          SELECT r.project_id, (r.recorded_at AT TIME ZONE 'UTC')::date, r.branch, r.subsystem
          FROM new_rows r) k
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER coverage_report_days_insert AFTER INSERT ON coverage_reports
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION coverage_report_days_inserted();
CREATE TRIGGER coverage_report_days_delete AFTER DELETE ON coverage_reports
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION coverage_report_days_deleted();
CREATE TRIGGER coverage_report_days_update AFTER UPDATE ON coverage_reports
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION coverage_report_days_updated();

-- Backfill from the reports stored so far, set-based (one pass; the
-- triggers above, created in this transaction, keep writers out until it
-- commits).
INSERT INTO coverage_report_days
    (project_id, day, branch, subsystem, report_count, lines_covered, lines_total,
     branches_covered, branches_total, functions_covered, functions_total,
     latest_id, latest_recorded_at, latest_lines_covered, latest_lines_total,
     latest_branches_covered, latest_branches_total, latest_functions_covered,
     latest_functions_total)
SELECT a.project_id, a.day, a.branch, a.subsystem, a.n, a.lc, a.lt, a.bc, a.bt, a.fc, a.ft,
       l.id, l.recorded_at, l.lines_covered, l.lines_total, l.branches_covered,
       l.branches_total, l.functions_covered, l.functions_total
FROM (SELECT project_id, (recorded_at AT TIME ZONE 'UTC')::date AS day, branch, subsystem,
             count(*) AS n, sum(lines_covered) AS lc, sum(lines_total) AS lt,
             sum(branches_covered) AS bc, sum(branches_total) AS bt,
             sum(functions_covered) AS fc, sum(functions_total) AS ft
      FROM coverage_reports GROUP BY 1, 2, 3, 4) a
JOIN (SELECT DISTINCT ON (project_id, (recorded_at AT TIME ZONE 'UTC')::date, branch, subsystem)
             project_id, (recorded_at AT TIME ZONE 'UTC')::date AS day, branch, subsystem, id,
             recorded_at, lines_covered, lines_total, branches_covered, branches_total,
             functions_covered, functions_total
      FROM coverage_reports
      ORDER BY project_id, (recorded_at AT TIME ZONE 'UTC')::date, branch, subsystem,
               recorded_at DESC, id DESC) l
  ON l.project_id = a.project_id AND l.day = a.day AND l.branch = a.branch
 AND l.subsystem = a.subsystem;
