-- Counts of the discrepancies stored before V27's triggers (issue 18). The
-- triggers count every row written from V27 on; this fills the tables from
-- the rows already there (recomputed whole: the tables hold exactly what
-- the stored rows say afterwards, whatever ran between V27 and here).
DELETE FROM discrepancy_session_counts;
DELETE FROM discrepancy_day_counts;
INSERT INTO discrepancy_session_counts AS c
    (project_id, session_id, session_created_at, dimension, key, n)
SELECT d.project_id, d.session_id, s.created_at, v.dimension, v.key, count(*)
FROM discrepancies d
JOIN sessions s ON s.project_id = d.project_id AND s.id = d.session_id
CROSS JOIN LATERAL (VALUES ('severity', d.severity::text), ('kind', d.kind),
                           ('resolution', d.resolution)) AS v(dimension, key)
GROUP BY 1, 2, 3, 4, 5;

INSERT INTO discrepancy_day_counts (project_id, day, dimension, key, n)
SELECT project_id, date_trunc('day', session_created_at, 'UTC'), dimension, key, sum(n)::bigint
FROM discrepancy_session_counts
GROUP BY 1, 2, 3, 4;
