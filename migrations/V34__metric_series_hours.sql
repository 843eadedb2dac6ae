-- Per-series hourly aggregates of metric points (issue 18): QueryTimeSeries
-- reads whole hours from here and only the partial hours at a range's edges
-- from metric_points.
--
-- metric_series: one row per (project, metric name, label set). The label
-- set is keyed by a SHA-256 digest of its canonical jsonb text (a label set
-- may be ~10 kB, beyond a btree entry's limit). Rows are never deleted by
-- the triggers (a series whose points all went keeps its row; it has no
-- hours); a project's deletion cascades.
--
-- metric_series_hours: per series and UTC hour (date_bin on the Unix epoch,
-- independent of the session's time zone): count, sum (each value clamped to
-- +-1e100, like QueryTimeSeries' sum), min, max and a sparse log-bucket
-- histogram (bucket numbers ascending, with their counts) from which
-- percentiles are estimated. Bucket of a value v (verdict_metric_bucket):
-- 0 for v = 0; for v > 0, 9000 + floor(8 log2 v); for v < 0 the negation of
-- the bucket of -v (so bucket order is value order); NaN and +-infinity take
-- +-20000. A bucket spans a factor 2^(1/8) ≈ 1.09 (the idea of V25's
-- duration histogram, signed and covering every float8 magnitude), and its
-- geometric middle is within 4.5 % of every value in it.
--
-- Both are kept by statement-level triggers on metric_points, in the writing
-- statement's transaction, so they are exactly as committed as the points:
-- INSERT (RecordMetricPoints, COPY, direct SQL) adds its points' aggregates
-- (upsert in key order, so concurrent writers lock rows in one order and
-- cannot deadlock); DELETE and UPDATE (retention, cleanup, cascades) lock the
-- touched series-hours in key order and recompute them from the raw points
-- (min and max cannot be decremented); TRUNCATE empties the hours.

-- The backfill below reads every point once: at 10M rows it takes minutes,
-- longer than the gateway's statement timeout.
SET LOCAL statement_timeout = 0;
-- No point is written between the backfill and the triggers going on: the
-- migration's transaction holds this lock until it commits (readers go on).
LOCK TABLE metric_points IN SHARE ROW EXCLUSIVE MODE;

CREATE FUNCTION verdict_metric_bucket(v float8) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$
    SELECT CASE WHEN v = 0 THEN 0
                WHEN v = 'NaN'::float8 OR v = 'Infinity'::float8 THEN 20000
                WHEN v = '-Infinity'::float8 THEN -20000
                WHEN v > 0 THEN 9000 + floor(8 * ln(v) / ln(2::float8))::int
                ELSE -(9000 + floor(8 * ln(-v) / ln(2::float8))::int) END
$$;

-- The key of a label set (jsonb's text form is canonical: keys sorted).
CREATE FUNCTION verdict_labels_digest(labels jsonb) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$ SELECT sha256(convert_to(labels::text, 'UTF8')) $$;

CREATE TABLE metric_series (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id    uuid   NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name          text   NOT NULL,
    labels        jsonb  NOT NULL,
    labels_digest bytea  NOT NULL,
    -- Also the index QueryTimeSeries finds a metric's series by (a label
    -- filter is checked on the few series of one name).
    UNIQUE (project_id, name, labels_digest)
);

-- series_id names a metric_series row of the same project. No foreign key
-- to it: series rows go only with their project, whose deletion takes these
-- rows too (by the key below, which leads with project_id), so no index
-- leading with series_id is needed.
CREATE TABLE metric_series_hours (
    project_id   uuid      NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    series_id    bigint    NOT NULL,
    hour         timestamptz NOT NULL,
    count        bigint    NOT NULL,
    sum          float8    NOT NULL,
    min          float8    NOT NULL,
    max          float8    NOT NULL,
    hist_buckets integer[] NOT NULL,
    hist_counts  bigint[]  NOT NULL,
    PRIMARY KEY (project_id, series_id, hour)
);

-- The series of each point of a set, created when new (in key order).
CREATE FUNCTION verdict_metric_series_ensure(projects uuid[], names text[], labels jsonb[])
RETURNS void LANGUAGE sql AS $$
    INSERT INTO metric_series (project_id, name, labels, labels_digest)
    SELECT DISTINCT ON (u.project_id, u.name, verdict_labels_digest(u.labels))
           u.project_id, u.name, u.labels, verdict_labels_digest(u.labels)
    FROM unnest(projects, names, labels) AS u(project_id, name, labels)
    WHERE NOT EXISTS (SELECT 1 FROM metric_series s
                      WHERE s.project_id = u.project_id AND s.name = u.name
                        AND s.labels_digest = verdict_labels_digest(u.labels))
    ORDER BY u.project_id, u.name, verdict_labels_digest(u.labels)
    ON CONFLICT (project_id, name, labels_digest) DO NOTHING
$$;

-- Recomputes the named series-hours from the raw points: rows are locked in
-- key order first, then (a new snapshot in READ COMMITTED) set to the
-- aggregate of the points, or deleted when none remain.
CREATE FUNCTION verdict_metric_hours_refresh(projects uuid[], series bigint[], hours timestamptz[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM metric_series_hours h
    JOIN (SELECT DISTINCT * FROM unnest(projects, series, hours) AS k(project_id, series_id, hour)) k
      ON h.project_id = k.project_id AND h.series_id = k.series_id AND h.hour = k.hour
    ORDER BY h.project_id, h.series_id, h.hour
    FOR UPDATE OF h;

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

-- Merges two sparse histograms.
CREATE FUNCTION verdict_hist_merge(ab integer[], an bigint[], bb integer[], bn bigint[])
RETURNS TABLE (buckets integer[], counts bigint[])
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_agg(m.b ORDER BY m.b), array_agg(m.n ORDER BY m.b)
    FROM (SELECT u.b, sum(u.n)::bigint AS n
          FROM (SELECT * FROM unnest(ab, an) UNION ALL SELECT * FROM unnest(bb, bn)) AS u(b, n)
          GROUP BY u.b) m
$$;

CREATE FUNCTION metric_series_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
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
    RETURN NULL;
END
$$;

CREATE FUNCTION metric_series_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM verdict_metric_hours_refresh(array_agg(project_id), array_agg(series_id), array_agg(hour))
    FROM (SELECT DISTINCT r.project_id, s.id AS series_id,
                 date_bin(interval '1 hour', r.recorded_at, 'epoch'::timestamptz) AS hour
          FROM old_rows r
          JOIN metric_series s ON s.project_id = r.project_id AND s.name = r.name
                              AND s.labels_digest = verdict_labels_digest(r.labels)) d
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION metric_series_updated() RETURNS trigger LANGUAGE plpgsql AS $$
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
    RETURN NULL;
END
$$;

CREATE FUNCTION metric_series_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM metric_series_hours;
    RETURN NULL;
END
$$;

-- Backfill: one set-based statement per table.
INSERT INTO metric_series (project_id, name, labels, labels_digest)
SELECT project_id, name, labels, verdict_labels_digest(labels)
FROM (SELECT DISTINCT project_id, name, labels FROM metric_points) d
ORDER BY 1, 2, 4;

INSERT INTO metric_series_hours
    (project_id, series_id, hour, count, sum, min, max, hist_buckets, hist_counts)
SELECT g.project_id, g.series_id, g.hour, sum(g.n)::bigint, sum(g.sum), min(g.min), max(g.max),
       array_agg(g.bucket ORDER BY g.bucket), array_agg(g.n ORDER BY g.bucket)
FROM (SELECT p.project_id, s.id AS series_id,
             date_bin(interval '1 hour', p.recorded_at, 'epoch'::timestamptz) AS hour,
             verdict_metric_bucket(p.value) AS bucket, count(*)::bigint AS n,
             sum(LEAST(GREATEST(p.value, -1e100::float8), 1e100::float8)) AS sum,
             min(p.value) AS min, max(p.value) AS max
      FROM metric_points p
      JOIN metric_series s ON s.project_id = p.project_id AND s.name = p.name AND s.labels = p.labels
      GROUP BY 1, 2, 3, 4) g
GROUP BY 1, 2, 3;

ANALYZE metric_series;
ANALYZE metric_series_hours;

CREATE TRIGGER metric_series_insert AFTER INSERT ON metric_points
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION metric_series_inserted();
CREATE TRIGGER metric_series_delete AFTER DELETE ON metric_points
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION metric_series_deleted();
CREATE TRIGGER metric_series_update AFTER UPDATE ON metric_points
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION metric_series_updated();
CREATE TRIGGER metric_series_truncate AFTER TRUNCATE ON metric_points
    FOR EACH STATEMENT EXECUTE FUNCTION metric_series_truncated();
