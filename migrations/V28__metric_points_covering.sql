-- QueryTimeSeries reads one metric's points of a time range (issue 18). The
-- index it uses now carries the value too, so a series without a label
-- filter is answered by an index-only scan: the points of one metric are
-- spread over every heap page (names interleave as they arrive), the index
-- keeps them together. (Labels stay out of the index: up to 32 labels of
-- 256 characters exceed a btree entry's limit; a label filter visits the
-- heap for the points of its metric and range.)
DROP INDEX metric_points_name_time_idx;
CREATE INDEX metric_points_name_time_idx
    ON metric_points (project_id, name, recorded_at) INCLUDE (value);
