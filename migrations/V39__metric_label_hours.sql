-- Per-label-pair hourly aggregates of metric points (issue 18):
-- QueryTimeSeries with a label filter of exactly one pair (env=prod) reads
-- whole hours from here, one row per hour, instead of one row per matching
-- series and hour from metric_series_hours (V34), whose rows and histogram
-- arrays grow with the series and the points per series-hour.
--
-- metric_label_hours: per (project, metric name, label key, label value, UTC
-- hour): the same columns as metric_series_hours (count, sum of values
-- clamped to +-1e100, min, max, sparse log-bucket histogram by
-- verdict_metric_bucket), i.e. the merge of the series-hours of that name
-- and hour whose labels hold the pair. A row exists exactly when a point of
-- the name with that pair lies in that hour.
--
-- The pairs of a label set (verdict_label_pairs) are its keys with a string
-- value: `labels @> '{"k": "v"}'` holds exactly when the labels hold the
-- pair k = "v" as a string (a number, array or object value never contains
-- a string), so a one-pair filter matches the same points here as on the
-- raw points. Pairs beyond the gateway's label limits (keys over 64, values
-- over 256 characters; only direct SQL writes such) are not kept: no filter
-- the gateway accepts can name them, and they could exceed a btree entry.
--
-- Kept by the same statement-level triggers on metric_points as V34 and
-- V38, in the writing statement's transaction, after the series-hours and
-- the name-hours: every writer locks series-hours, then name-hours, then
-- label-hours (each in key order), one global order, so concurrent writers
-- cannot deadlock.
--   INSERT: upsert of the new points' aggregates per label-hour, in key
--     order.
--   DELETE, UPDATE: the touched label-hours are upserted in key order (a
--     placeholder for a new key; both lock the key, waiting for any writer
--     in flight on it) and then, with the next statement's snapshot (READ
--     COMMITTED), set to the merge of the matching series-hours, or deleted
--     when there is none (as V38's name-hours).
--   TRUNCATE: empties the table.
-- A project being deleted (the points' cascade) gets no new row.

-- The backfill reads every series-hour once.
SET LOCAL statement_timeout = 0;
-- No point is written between the backfill and the new trigger bodies: the
-- migration's transaction holds this lock until it commits (readers go on).
LOCK TABLE metric_points IN SHARE ROW EXCLUSIVE MODE;

-- V34's bucket function, the same for every input (NULL gives NULL either
-- way), without STRICT: PostgreSQL inlines a SQL function into the calling
-- statement only when it is not STRICT (the CASE is not strict), and a call
-- per point cost about 4 µs, ~45 ms of a 10,000-point INSERT per share of
-- the trigger (three shares now), against ~1.5 ms inlined.
CREATE OR REPLACE FUNCTION verdict_metric_bucket(v float8) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN v = 0 THEN 0
                WHEN v = 'NaN'::float8 OR v = 'Infinity'::float8 THEN 20000
                WHEN v = '-Infinity'::float8 THEN -20000
                WHEN v > 0 THEN 9000 + floor(8 * ln(v) / ln(2::float8))::int
                ELSE -(9000 + floor(8 * ln(-v) / ln(2::float8))::int) END
$$;

CREATE TABLE metric_label_hours (
    project_id   uuid        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name         text        NOT NULL,
    label_key    text        NOT NULL,
    label_value  text        NOT NULL,
    hour         timestamptz NOT NULL,
    count        bigint      NOT NULL,
    sum          float8      NOT NULL,
    min          float8      NOT NULL,
    max          float8      NOT NULL,
    hist_buckets integer[]   NOT NULL,
    hist_counts  bigint[]    NOT NULL,
    -- Also the index QueryTimeSeries reads a pair's range of hours by.
    PRIMARY KEY (project_id, name, label_key, label_value, hour)
);

-- The label pairs of a label set that metric_label_hours keeps (string
-- values within the gateway's limits; a non-object label set has none).
CREATE FUNCTION verdict_label_pairs(labels jsonb)
RETURNS TABLE (label_key text, label_value text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT e.key, e.value #>> '{}'
    FROM jsonb_each(CASE WHEN jsonb_typeof(labels) = 'object' THEN labels ELSE '{}'::jsonb END) e
    WHERE jsonb_typeof(e.value) = 'string'
      AND char_length(e.key) <= 64 AND char_length(e.value #>> '{}') <= 256
$$;

-- Recomputes the named label-hours from metric_series_hours (which the
-- trigger has brought up to date first): lock every key in key order
-- (creating placeholders for new keys), then set each to the merge of the
-- series-hours of the name and hour whose labels hold the pair, and delete
-- those with none.
CREATE FUNCTION verdict_metric_label_hours_refresh(
    projects uuid[], names text[], keys text[], vals text[], hours timestamptz[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO metric_label_hours AS h
        (project_id, name, label_key, label_value, hour, count, sum, min, max,
         hist_buckets, hist_counts)
    SELECT DISTINCT k.project_id, k.name, k.label_key, k.label_value, k.hour,
           0::bigint, 0::float8, 0::float8, 0::float8, '{}'::integer[], '{}'::bigint[]
    FROM unnest(projects, names, keys, vals, hours) AS k(project_id, name, label_key, label_value, hour)
    -- Not for a project being deleted (the points' cascade): its rows go
    -- with it, and a new row would fail its foreign key.
    WHERE EXISTS (SELECT 1 FROM projects p WHERE p.id = k.project_id)
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (project_id, name, label_key, label_value, hour) DO UPDATE SET count = h.count;

    UPDATE metric_label_hours h
    SET count = a.count, sum = a.sum, min = a.min, max = a.max,
        hist_buckets = hist.buckets, hist_counts = hist.counts
    FROM (SELECT DISTINCT * FROM unnest(projects, names, keys, vals, hours)
                 AS k(project_id, name, label_key, label_value, hour)) k
    CROSS JOIN LATERAL (
        SELECT sum(sh.count)::bigint AS count, sum(sh.sum) AS sum, min(sh.min) AS min,
               max(sh.max) AS max
        FROM metric_series s
        JOIN metric_series_hours sh
          ON sh.project_id = s.project_id AND sh.series_id = s.id AND sh.hour = k.hour
        WHERE s.project_id = k.project_id AND s.name = k.name
          AND EXISTS (SELECT 1 FROM verdict_label_pairs(s.labels) l
                      WHERE l.label_key = k.label_key AND l.label_value = k.label_value)
    ) a
    CROSS JOIN LATERAL (
        SELECT array_agg(m.b ORDER BY m.b) AS buckets, array_agg(m.n ORDER BY m.b) AS counts
        FROM (SELECT u.b, sum(u.n)::bigint AS n
              FROM metric_series s
              JOIN metric_series_hours sh
                ON sh.project_id = s.project_id AND sh.series_id = s.id AND sh.hour = k.hour
              CROSS JOIN LATERAL unnest(sh.hist_buckets, sh.hist_counts) AS u(b, n)
              WHERE s.project_id = k.project_id AND s.name = k.name
                AND EXISTS (SELECT 1 FROM verdict_label_pairs(s.labels) l
                            WHERE l.label_key = k.label_key AND l.label_value = k.label_value)
              GROUP BY u.b) m
    ) hist
    WHERE h.project_id = k.project_id AND h.name = k.name AND h.label_key = k.label_key
      AND h.label_value = k.label_value AND h.hour = k.hour
      AND a.count > 0;

    DELETE FROM metric_label_hours h
    USING (SELECT DISTINCT * FROM unnest(projects, names, keys, vals, hours)
                  AS k(project_id, name, label_key, label_value, hour)) k
    WHERE h.project_id = k.project_id AND h.name = k.name AND h.label_key = k.label_key
      AND h.label_value = k.label_value AND h.hour = k.hour
      AND NOT EXISTS (SELECT 1 FROM metric_series s
                      JOIN metric_series_hours sh
                        ON sh.project_id = s.project_id AND sh.series_id = s.id AND sh.hour = k.hour
                      WHERE s.project_id = k.project_id AND s.name = k.name
                        AND EXISTS (SELECT 1 FROM verdict_label_pairs(s.labels) l
                                    WHERE l.label_key = k.label_key
                                      AND l.label_value = k.label_value));
END
$$;

-- The trigger bodies of V38, each followed by the label-hours' share.
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

    -- The points are first grouped per label set (few per batch), then
    -- each group is counted under each of its pairs.
    INSERT INTO metric_label_hours AS h
        (project_id, name, label_key, label_value, hour, count, sum, min, max,
         hist_buckets, hist_counts)
    SELECT b.project_id, b.name, b.label_key, b.label_value, b.hour,
           sum(b.n)::bigint, sum(b.sum), min(b.min), max(b.max),
           array_agg(b.bucket ORDER BY b.bucket), array_agg(b.n ORDER BY b.bucket)
    FROM (SELECT g.project_id, g.name, l.label_key, l.label_value, g.hour, g.bucket,
                 sum(g.n)::bigint AS n, sum(g.sum) AS sum, min(g.min) AS min, max(g.max) AS max
          FROM (SELECT r.project_id, r.name, r.labels,
                       date_bin(interval '1 hour', r.recorded_at, 'epoch'::timestamptz) AS hour,
                       verdict_metric_bucket(r.value) AS bucket, count(*)::bigint AS n,
                       sum(LEAST(GREATEST(r.value, -1e100::float8), 1e100::float8)) AS sum,
                       min(r.value) AS min, max(r.value) AS max
                FROM new_rows r
                GROUP BY 1, 2, 3, 4, 5) g
          CROSS JOIN LATERAL verdict_label_pairs(g.labels) l
          GROUP BY 1, 2, 3, 4, 5, 6) b
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (project_id, name, label_key, label_value, hour) DO UPDATE
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

    PERFORM verdict_metric_label_hours_refresh(array_agg(project_id), array_agg(name),
                                               array_agg(label_key), array_agg(label_value),
                                               array_agg(hour))
    FROM (SELECT DISTINCT d.project_id, d.name, l.label_key, l.label_value, d.hour
          FROM (SELECT DISTINCT project_id, name, labels,
                       date_bin(interval '1 hour', recorded_at, 'epoch'::timestamptz) AS hour
                FROM old_rows) d
          CROSS JOIN LATERAL verdict_label_pairs(d.labels) l) x
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

    PERFORM verdict_metric_label_hours_refresh(array_agg(project_id), array_agg(name),
                                               array_agg(label_key), array_agg(label_value),
                                               array_agg(hour))
    FROM (SELECT DISTINCT d.project_id, d.name, l.label_key, l.label_value, d.hour
          FROM (SELECT DISTINCT x.project_id, x.name, x.labels,
                       date_bin(interval '1 hour', x.recorded_at, 'epoch'::timestamptz) AS hour
                FROM (SELECT project_id, name, labels, recorded_at FROM old_rows
                      UNION ALL
                      SELECT project_id, name, labels, recorded_at FROM new_rows) x) d
          CROSS JOIN LATERAL verdict_label_pairs(d.labels) l) y
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION metric_series_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM metric_series_hours;
    DELETE FROM metric_name_hours;
    DELETE FROM metric_label_hours;
    RETURN NULL;
END
$$;

-- Backfill, set-based, from the series-hours (which V34's and V38's
-- triggers keep equal to the points).
INSERT INTO metric_label_hours
    (project_id, name, label_key, label_value, hour, count, sum, min, max,
     hist_buckets, hist_counts)
SELECT t.project_id, t.name, t.label_key, t.label_value, t.hour, t.count, t.sum, t.min, t.max,
       hb.buckets, hb.counts
FROM (SELECT s.project_id, s.name, l.label_key, l.label_value, sh.hour,
             sum(sh.count)::bigint AS count, sum(sh.sum) AS sum, min(sh.min) AS min,
             max(sh.max) AS max
      FROM metric_series_hours sh
      JOIN metric_series s ON s.id = sh.series_id AND s.project_id = sh.project_id
      CROSS JOIN LATERAL verdict_label_pairs(s.labels) l
      GROUP BY 1, 2, 3, 4, 5) t
JOIN (SELECT m.project_id, m.name, m.label_key, m.label_value, m.hour,
             array_agg(m.b ORDER BY m.b) AS buckets, array_agg(m.n ORDER BY m.b) AS counts
      FROM (SELECT s.project_id, s.name, l.label_key, l.label_value, sh.hour, u.b,
                   sum(u.n)::bigint AS n
            FROM metric_series_hours sh
            JOIN metric_series s ON s.id = sh.series_id AND s.project_id = sh.project_id
            CROSS JOIN LATERAL verdict_label_pairs(s.labels) l
            CROSS JOIN LATERAL unnest(sh.hist_buckets, sh.hist_counts) AS u(b, n)
            GROUP BY 1, 2, 3, 4, 5, 6) m
      GROUP BY 1, 2, 3, 4, 5) hb
  ON hb.project_id = t.project_id AND hb.name = t.name AND hb.label_key = t.label_key
 AND hb.label_value = t.label_value AND hb.hour = t.hour
ORDER BY 1, 2, 3, 4, 5;

ANALYZE metric_label_hours;
