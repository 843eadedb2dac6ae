-- Packed histograms for reading hours (issue 18): QueryTimeSeries read the
-- histogram of every hour as two arrays (hist_buckets integer[],
-- hist_counts bigint[]). PostgreSQL sends an array in the binary protocol
-- element by element, one call of the element type's send function each,
-- so at tens of millions of points, where an hour's histogram holds more
-- buckets, sending the arrays of a 90-day range cost more than running
-- the statement. The per-name and per-label-pair hours (V38, V39) now also
-- keep both arrays packed into one bytea, computed when the row is written:
-- a read sends it as one value and the gateway decodes it in place.
--
-- `hist` is array_send(hist_buckets) || array_send(hist_counts): each in
-- PostgreSQL's binary array format (dimensions, null flag, element type,
-- then per element its length and its big-endian value), the bucket
-- numbers (int4) first, then their counts (int8). The arrays stay the
-- source of truth: the triggers merge and recompute them as before, and a
-- stored generated column follows every change to them.

SET LOCAL statement_timeout = 0;

-- Declared IMMUTABLE for the generated column: array_send is marked STABLE
-- only because an element type's send function may be; int4send and
-- int8send depend on nothing but their input.
CREATE FUNCTION verdict_hist_pack(buckets integer[], counts bigint[]) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT array_send(buckets) || array_send(counts) $$;

ALTER TABLE metric_name_hours
    ADD COLUMN hist bytea GENERATED ALWAYS AS (verdict_hist_pack(hist_buckets, hist_counts)) STORED;
ALTER TABLE metric_label_hours
    ADD COLUMN hist bytea GENERATED ALWAYS AS (verdict_hist_pack(hist_buckets, hist_counts)) STORED;

ANALYZE metric_name_hours;
ANALYZE metric_label_hours;
