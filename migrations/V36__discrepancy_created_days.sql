-- Discrepancies per project, UTC day of their creation and severity,
-- maintained at write time (issue 18): ComputeRollups sums these instead of
-- counting every discrepancy of the periods it computes again.
--
-- discrepancy_day_counts (V27) counts by the day the discrepancy's SESSION
-- was created; rollups count a discrepancy in the period it was itself
-- created in (metrics.proto, Rollup), hence this table.
--
-- Kept by statement-level triggers on discrepancies (INSERT, DELETE, and an
-- UPDATE of project_id, created_at or severity), in the writing statement's
-- transaction, so the counts are exactly as committed as the rows they
-- count. Each trigger applies its changes in one statement, in key order
-- (no lock-order deadlock between two single-statement writers).
-- `changed_at` tells an incremental ComputeRollups which days moved since
-- its watermark: for inserted rows the latest created_at among them (at
-- most now(), as the raw rows' created_at said before), for deletes and
-- updates now() (so a deletion is recomputed too); it only moves forward.
-- Rows whose count went to 0 may stay (readers sum them).

-- The backfill reads every discrepancy once (minutes at tens of millions),
-- longer than the gateway's statement timeout.
SET LOCAL statement_timeout = 0;

CREATE TABLE discrepancy_created_days (
    project_id uuid        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    -- The UTC day of created_at.
    day        date        NOT NULL,
    severity   smallint    NOT NULL,
    n          bigint      NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, day, severity)
);
-- Touched days since a watermark.
CREATE INDEX discrepancy_created_days_changed_idx
    ON discrepancy_created_days (project_id, changed_at);

-- Applies signed deltas per key (one statement, key order). A negative
-- delta only updates a row that exists (the cascade of a project's deletion
-- may have removed it already: then there is nothing to take out).
CREATE FUNCTION discrepancy_created_days_apply(
    p_project uuid[], p_day date[], p_severity smallint[], p_n bigint[],
    p_changed timestamptz[]
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO discrepancy_created_days AS c (project_id, day, severity, n, changed_at)
    SELECT g.project_id, g.day, g.severity, g.n, g.changed
    FROM (SELECT u.project_id, u.day, u.severity, sum(u.n)::bigint AS n,
                 max(u.changed) AS changed
          FROM unnest(p_project, p_day, p_severity, p_n, p_changed)
               AS u(project_id, day, severity, n, changed)
          GROUP BY 1, 2, 3) g
    WHERE g.n <> 0
      AND (g.n > 0 OR EXISTS (SELECT 1 FROM discrepancy_created_days x
                               WHERE x.project_id = g.project_id AND x.day = g.day
                                 AND x.severity = g.severity))
    ORDER BY 1, 2, 3
    ON CONFLICT (project_id, day, severity)
    DO UPDATE SET n = c.n + EXCLUDED.n, changed_at = GREATEST(c.changed_at, EXCLUDED.changed_at);
$$;

CREATE FUNCTION discrepancy_created_days_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM discrepancy_created_days_apply(array_agg(project_id), array_agg(day),
                                           array_agg(severity), array_agg(n), array_agg(changed))
    FROM (SELECT r.project_id, (r.created_at AT TIME ZONE 'UTC')::date AS day, r.severity,
                 count(*)::bigint AS n, LEAST(max(r.created_at), now()) AS changed
          FROM new_rows r GROUP BY 1, 2, 3) d
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION discrepancy_created_days_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM discrepancy_created_days_apply(array_agg(project_id), array_agg(day),
                                           array_agg(severity), array_agg(n), array_agg(now()))
    FROM (SELECT r.project_id, (r.created_at AT TIME ZONE 'UTC')::date AS day, r.severity,
                 -count(*)::bigint AS n
          FROM old_rows r GROUP BY 1, 2, 3) d
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION discrepancy_created_days_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM discrepancy_created_days_apply(array_agg(project_id), array_agg(day),
                                           array_agg(severity), array_agg(n), array_agg(now()))
    FROM (SELECT x.project_id, (x.created_at AT TIME ZONE 'UTC')::date AS day, x.severity,
                 sum(x.sign)::bigint AS n
          FROM (SELECT o.project_id, o.created_at, o.severity, -1 AS sign FROM old_rows o
                UNION ALL
                SELECT r.project_id, r.created_at, r.severity, 1 FROM new_rows r) x
          GROUP BY 1, 2, 3
          HAVING sum(x.sign) <> 0) d
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER discrepancy_created_days_insert AFTER INSERT ON discrepancies
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION discrepancy_created_days_inserted();
CREATE TRIGGER discrepancy_created_days_delete AFTER DELETE ON discrepancies
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION discrepancy_created_days_deleted();
-- Statement triggers with transition tables cannot name columns (UPDATE OF):
-- this one fires on every UPDATE and counts only rows whose day or severity
-- changed (a resolution update has no delta: one cheap pass over its rows).
CREATE TRIGGER discrepancy_created_days_update AFTER UPDATE ON discrepancies
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION discrepancy_created_days_updated();

-- Backfill from the rows stored so far (the triggers above are created in
-- this transaction, whose lock on discrepancies keeps writers out until it
-- commits: nothing is counted twice or missed).
INSERT INTO discrepancy_created_days (project_id, day, severity, n, changed_at)
SELECT project_id, (created_at AT TIME ZONE 'UTC')::date, severity, count(*),
       LEAST(max(created_at), now())
FROM discrepancies
GROUP BY 1, 2, 3;
