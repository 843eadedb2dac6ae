-- Per-metric hourly aggregates across all series (issue 18): QueryTimeSeries
-- without a label filter reads whole hours from here (one row per hour of
-- the metric) instead of one row per series and hour from
-- metric_series_hours (V34), whose rows of a metric with many series and
-- few points per series-hour are many and barely compress.
--
-- metric_name_hours: per (project, metric name, UTC hour): the same columns
-- as metric_series_hours (count, sum of values clamped to +-1e100, min, max,
-- sparse log-bucket histogram by verdict_metric_bucket), i.e. the merge of
-- the metric's series-hours of that hour. A row exists exactly when the
-- metric has a point in that hour.
--
-- Kept by the same statement-level triggers on metric_points as V34, in the
-- writing statement's transaction, after the series-hours: every writer
-- locks series-hours (in key order) and then name-hours (in key order), one
-- global order, so concurrent writers cannot deadlock.
--   INSERT: upsert of the new points' aggregates per name-hour, in key order.
--   DELETE, UPDATE: the touched name-hours are upserted in key order (a
--     no-op update of an existing row, a placeholder for a new one; both
--     lock the key, waiting for any writer in flight on it) and then, with
--     the next statement's snapshot (READ COMMITTED), set to the merge of
--     the metric's series-hours of that hour, or deleted when it has none.
--     A writer that adds to the hour afterwards waits for the lock and adds
--     to the recomputed row; one that added before has committed.
--   TRUNCATE: empties the table.

-- The backfill reads every series-hour once.
SET LOCAL statement_timeout = 0;
-- No point is written between the backfill and the new trigger bodies: the
-- migration's transaction holds this lock until it commits (readers go on).
LOCK TABLE metric_points IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE metric_name_hours (
    project_id   uuid        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name         text        NOT NULL,
    hour         timestamptz NOT NULL,
    count        bigint      NOT NULL,
    sum          float8      NOT NULL,
    min          float8      NOT NULL,
    max          float8      NOT NULL,
    hist_buckets integer[]   NOT NULL,
    hist_counts  bigint[]    NOT NULL,
    PRIMARY KEY (project_id, name, hour)
);

-- Recomputes the named name-hours from metric_series_hours (which the
-- trigger has brought up to date first): lock every key in key order
-- (creating placeholders for new keys), then set each to the merge of its
-- series-hours, and delete those with none.
CREATE FUNCTION verdict_metric_name_hours_refresh(projects uuid[], names text[], hours timestamptz[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO metric_name_hours AS h
        (project_id, name, hour, count, sum, min, max, hist_buckets, hist_counts)
    SELECT DISTINCT k.project_id, k.name, k.hour, 0::bigint, 0::float8, 0::float8, 0::float8,
           '{}'::integer[], '{}'::bigint[]
    FROM unnest(projects, names, hours) AS k(project_id, name, hour)
    -- Not for a project being deleted (the points' cascade): its rows go
    -- with it, and a new row would fail its foreign key.
    WHERE EXISTS (SELECT 1 FROM projects p WHERE p.id = k.project_id)
    ORDER BY 1, 2, 3
    ON CONFLICT (project_id, name, hour) DO UPDATE SET count = h.count;

    UPDATE metric_name_hours h
    SET count = a.count, sum = a.sum, min = a.min, max = a.max,
        hist_buckets = hist.buckets, hist_counts = hist.counts
    FROM (SELECT DISTINCT * FROM unnest(projects, names, hours) AS k(project_id, name, hour)) k
    CROSS JOIN LATERAL (
        SELECT sum(sh.count)::bigint AS count, sum(sh.sum) AS sum, min(sh.min) AS min,
               max(sh.max) AS max
        FROM metric_series s
        JOIN metric_series_hours sh
          ON sh.project_id = s.project_id AND sh.series_id = s.id AND sh.hour = k.hour
        WHERE s.project_id = k.project_id AND s.name = k.name
    ) a
    CROSS JOIN LATERAL (
        SELECT array_agg(m.b ORDER BY m.b) AS buckets, array_agg(m.n ORDER BY m.b) AS counts
        FROM (SELECT u.b, sum(u.n)::bigint AS n
              FROM metric_series s
              JOIN metric_series_hours sh
                ON sh.project_id = s.project_id AND sh.series_id = s.id AND sh.hour = k.hour
              CROSS JOIN LATERAL unnest(sh.hist_buckets, sh.hist_counts) AS u(b, n)
              WHERE s.project_id = k.project_id AND s.name = k.name
              GROUP BY u.b) m
    ) hist
    WHERE h.project_id = k.project_id AND h.name = k.name AND h.hour = k.hour
      AND a.count > 0;

    DELETE FROM metric_name_hours h
    USING (SELECT DISTINCT * FROM unnest(projects, names, hours) AS k(project_id, name, hour)) k
    WHERE h.project_id = k.project_id AND h.name = k.name AND h.hour = k.hour
      AND NOT EXISTS (SELECT 1 FROM metric_series s
                      JOIN metric_series_hours sh
                        ON sh.project_id = s.project_id AND sh.series_id = s.id AND sh.hour = k.hour
                      WHERE s.project_id = k.project_id AND s.name = k.name);
END
$$;

-- V34's refresh of series-hours, with the same locking as the name-hours':
-- V34 locked only the keys that existed (FOR UPDATE), so an UPDATE moving
-- points into a series-hour that a concurrent INSERT was creating
-- recomputed it without the insert's points and then overwrote the
-- inserted row (ON CONFLICT waits for the inserter, then sets). Now every
-- key is upserted in key order first (a placeholder for a new one), which
-- waits for any writer in flight on it; the recompute's snapshot is taken
-- after, and later writers add to the recomputed row.
CREATE OR REPLACE FUNCTION verdict_metric_hours_refresh(projects uuid[], series bigint[], hours timestamptz[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO metric_series_hours AS h
        (project_id, series_id, hour, count, sum, min, max, hist_buckets, hist_counts)
    SELECT DISTINCT k.project_id, k.series_id, k.hour, 0::bigint, 0::float8, 0::float8, 0::float8,
           '{}'::integer[], '{}'::bigint[]
    FROM unnest(projects, series, hours) AS k(project_id, series_id, hour)
    WHERE EXISTS (SELECT 1 FROM projects p WHERE p.id = k.project_id)
    ORDER BY 1, 2, 3
    ON CONFLICT (project_id, series_id, hour) DO UPDATE SET count = h.count;

    INSERT INTO metric_series_hours AS h
        (project_id, series_id, hour, count, sum, min, max, hist_buckets, hist_counts)
    SELECT k.project_id, k.series_id, k.hour, a.count, a.sum, a.min, a.max, a.buckets, a.counts
    FROM (SELECT DISTINCT * FROM unnest(projects, series, hours) AS k(project_id, series_id, hour)) k
    JOIN metric_series s ON s.id = k.series_id AND s.project_id = k.project_id
    CROSS JOIN LATERAL (
        SELECT sum(b.n)::bigint AS count, sum(b.sum) AS sum, min(b.min) AS min, max(b.max) AS max,
               array_agg(b.bucket ORDER BY b.bucket) AS buckets,
               array_agg(b.n ORDER BY b.bucket) AS counts
        FROM (SELECT verdict_metric_bucket(p.value) AS bucket, count(*)::bigint AS n,
                     sum(LEAST(GREATEST(p.value, -1e100::float8), 1e100::float8)) AS sum,
                     min(p.value) AS min, max(p.value) AS max
              FROM metric_points p
              WHERE p.project_id = s.project_id AND p.name = s.name
                AND p.recorded_at >= k.hour AND p.recorded_at < k.hour + interval '1 hour'
                AND p.labels = s.labels
              GROUP BY 1) b
    ) a
    WHERE a.count > 0
    ORDER BY 1, 2, 3
    ON CONFLICT (project_id, series_id, hour) DO UPDATE
        SET count = EXCLUDED.count, sum = EXCLUDED.sum, min = EXCLUDED.min, max = EXCLUDED.max,
            hist_buckets = EXCLUDED.hist_buckets, hist_counts = EXCLUDED.hist_counts;

    DELETE FROM metric_series_hours h
    USING (SELECT DISTINCT * FROM unnest(projects, series, hours) AS k(project_id, series_id, hour)) k
    WHERE h.project_id = k.project_id AND h.series_id = k.series_id AND h.hour = k.hour
      AND NOT EXISTS (SELECT 1 FROM metric_series s JOIN metric_points p
                        ON p.project_id = s.project_id AND p.name = s.name AND p.labels = s.labels
                      WHERE s.id = k.series_id
                        AND p.recorded_at >= k.hour AND p.recorded_at < k.hour + interval '1 hour');
END
$$;

-- The trigger bodies of V34, each followed by the name-hours' share.
CREATE OR REPLACE FUNCTION metric_series_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM verdict_metric_series_ensure(array_agg(project_id), array_agg(name), array_agg(labels))
    FROM (SELECT DISTINCT project_id, name, labels FROM new_rows) d
    HAVING count(*) > 0;

    INSERT INTO metric_series_hours AS h
        (project_id, series_id, hour, count, sum, min, max, hist_buckets, hist_counts)
    SELECT g.project_id, g.series_id, g.hour, sum(g.n)::bigint, sum(g.sum), min(g.min), max(g.max),
           array_agg(g.bucket ORDER BY g.bucket), array_agg(g.n ORDER BY g.bucket)
    FROM (SELECT r.project_id, s.id AS series_id,
                 date_bin(interval '1 hour', r.recorded_at, 'epoch'::timestamptz) AS hour,
                 verdict_metric_bucket(r.value) AS bucket, count(*)::bigint AS n,
                 sum(LEAST(GREATEST(r.value, -1e100::float8), 1e100::float8)) AS sum,
                 min(r.value) AS min, max(r.value) AS max
          FROM new_rows r
          JOIN metric_series s ON s.project_id = r.project_id AND s.name = r.name
                              AND s.labels_digest = verdict_labels_digest(r.labels)
          GROUP BY 1, 2, 3, 4) g
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (project_id, series_id, hour) DO UPDATE
        SET count = h.count + EXCLUDED.count, sum = h.sum + EXCLUDED.sum,
            min = LEAST(h.min, EXCLUDED.min), max = GREATEST(h.max, EXCLUDED.max),
            (hist_buckets, hist_counts) = (SELECT m.buckets, m.counts FROM verdict_hist_merge(
                h.hist_buckets, h.hist_counts, EXCLUDED.hist_buckets, EXCLUDED.hist_counts) m);

    INSERT INTO metric_name_hours AS h
        (project_id, name, hour, count, sum, min, max, hist_buckets, hist_counts)
    SELECT g.project_id, g.name, g.hour, sum(g.n)::bigint, sum(g.sum), min(g.min), max(g.max),
           array_agg(g.bucket ORDER BY g.bucket), array_agg(g.n ORDER BY g.bucket)
    FROM (SELECT r.project_id, r.name,
                 date_bin(interval '1 hour', r.recorded_at, 'epoch'::timestamptz) AS hour,
                 verdict_metric_bucket(r.value) AS bucket, count(*)::bigint AS n,
                 sum(LEAST(GREATEST(r.value, -1e100::float8), 1e100::float8)) AS sum,
                 min(r.value) AS min, max(r.value) AS max
          FROM new_rows r
          GROUP BY 1, 2, 3, 4) g
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (project_id, name, hour) DO UPDATE
        SET count = h.count + EXCLUDED.count, sum = h.sum + EXCLUDED.sum,
            min = LEAST(h.min, EXCLUDED.min), max = GREATEST(h.max, EXCLUDED.max),
            (hist_buckets, hist_counts) = (SELECT m.buckets, m.counts FROM verdict_hist_merge(
                h.hist_buckets, h.hist_counts, EXCLUDED.hist_buckets, EXCLUDED.hist_counts) m);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION metric_series_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM verdict_metric_hours_refresh(array_agg(project_id), array_agg(series_id), array_agg(hour))
    FROM (SELECT DISTINCT r.project_id, s.id AS series_id,
                 date_bin(interval '1 hour', r.recorded_at, 'epoch'::timestamptz) AS hour
          FROM old_rows r
          JOIN metric_series s ON s.project_id = r.project_id AND s.name = r.name
                              AND s.labels_digest = verdict_labels_digest(r.labels)) d
    HAVING count(*) > 0;

    PERFORM verdict_metric_name_hours_refresh(array_agg(project_id), array_agg(name), array_agg(hour))
    FROM (SELECT DISTINCT project_id, name,
                 date_bin(interval '1 hour', recorded_at, 'epoch'::timestamptz) AS hour
          FROM old_rows) d
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION metric_series_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM verdict_metric_series_ensure(array_agg(project_id), array_agg(name), array_agg(labels))
    FROM (SELECT DISTINCT project_id, name, labels FROM new_rows) d
    HAVING count(*) > 0;

    PERFORM verdict_metric_hours_refresh(array_agg(project_id), array_agg(series_id), array_agg(hour))
    FROM (SELECT DISTINCT x.project_id, s.id AS series_id,
                 date_bin(interval '1 hour', x.recorded_at, 'epoch'::timestamptz) AS hour
          FROM (SELECT project_id, name, labels, recorded_at FROM old_rows
                UNION ALL
                SELECT project_id, name, labels, recorded_at FROM new_rows) x
          JOIN metric_series s ON s.project_id = x.project_id AND s.name = x.name
                              AND s.labels_digest = verdict_labels_digest(x.labels)) d
    HAVING count(*) > 0;

    PERFORM verdict_metric_name_hours_refresh(array_agg(project_id), array_agg(name), array_agg(hour))
    FROM (SELECT DISTINCT x.project_id, x.name,
                 date_bin(interval '1 hour', x.recorded_at, 'epoch'::timestamptz) AS hour
          FROM (SELECT project_id, name, recorded_at FROM old_rows
                UNION ALL
                SELECT project_id, name, recorded_at FROM new_rows) x) d
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION metric_series_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM metric_series_hours;
    DELETE FROM metric_name_hours;
    RETURN NULL;
END
$$;

-- Backfill, set-based, from the series-hours (which V34's triggers keep
-- equal to the points).
INSERT INTO metric_name_hours
    (project_id, name, hour, count, sum, min, max, hist_buckets, hist_counts)
SELECT t.project_id, t.name, t.hour, t.count, t.sum, t.min, t.max, hb.buckets, hb.counts
FROM (SELECT s.project_id, s.name, sh.hour, sum(sh.count)::bigint AS count, sum(sh.sum) AS sum,
             min(sh.min) AS min, max(sh.max) AS max
      FROM metric_series_hours sh
      JOIN metric_series s ON s.id = sh.series_id AND s.project_id = sh.project_id
      GROUP BY 1, 2, 3) t
JOIN (SELECT m.project_id, m.name, m.hour,
             array_agg(m.b ORDER BY m.b) AS buckets, array_agg(m.n ORDER BY m.b) AS counts
      FROM (SELECT s.project_id, s.name, sh.hour, u.b, sum(u.n)::bigint AS n
            FROM metric_series_hours sh
            JOIN metric_series s ON s.id = sh.series_id AND s.project_id = sh.project_id
            CROSS JOIN LATERAL unnest(sh.hist_buckets, sh.hist_counts) AS u(b, n)
            GROUP BY 1, 2, 3, 4) m
      GROUP BY 1, 2, 3) hb
  ON hb.project_id = t.project_id AND hb.name = t.name AND hb.hour = t.hour
ORDER BY 1, 2, 3;

ANALYZE metric_name_hours;
