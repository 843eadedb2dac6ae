-- Discrepancy counts maintained at write time (issue 18): SummarizeDiscrepancies
-- reads these instead of grouping every discrepancy of the sessions it names.
--
-- discrepancy_session_counts: per session, the number of its discrepancies
-- per severity (key '1'..'5'), kind and resolution. `session_created_at` is
-- the session's creation time, carried so a summary of the sessions created
-- in a range finds the rows of the range's partial days by an index.
-- discrepancy_day_counts: the same counts summed over the sessions created on
-- one UTC day (`day` is that day's midnight, UTC); a range's whole days read
-- these. Rows whose count went to 0 may stay in the day table (readers skip
-- them); the session table deletes them.
--
-- Both are kept by statement-level triggers on discrepancies (INSERT, UPDATE,
-- DELETE, including the cascade of a session's or project's deletion), in
-- the writing statement's transaction, so they are exactly as committed as
-- the rows they count. Each trigger applies its changes in one statement in
-- key order (no lock-order deadlock between two single-statement writers).
-- Neither table has a foreign key to sessions: when a session is deleted its
-- discrepancies' DELETE trigger still finds `session_created_at` here and
-- takes its counts back out.

CREATE TABLE discrepancy_session_counts (
    project_id         uuid        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    session_id         uuid        NOT NULL,
    session_created_at timestamptz NOT NULL,
    dimension          text        NOT NULL CHECK (dimension IN ('severity', 'kind', 'resolution')),
    key                text        NOT NULL,
    n                  bigint      NOT NULL,
    PRIMARY KEY (project_id, session_id, dimension, key)
);
-- The partial days at the edges of a range of sessions.
CREATE INDEX discrepancy_session_counts_created_idx
    ON discrepancy_session_counts (project_id, session_created_at);

CREATE TABLE discrepancy_day_counts (
    project_id uuid        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    day        timestamptz NOT NULL,
    dimension  text        NOT NULL CHECK (dimension IN ('severity', 'kind', 'resolution')),
    key        text        NOT NULL,
    n          bigint      NOT NULL,
    PRIMARY KEY (project_id, day, dimension, key)
);

-- Signed per-session deltas (arrays of the same length), summed per key,
-- with the session's creation time (from the counts, else the session).
CREATE FUNCTION discrepancy_count_delta(
    p_project uuid[], p_session uuid[], p_dimension text[], p_key text[], p_n bigint[]
) RETURNS TABLE (project_id uuid, session_id uuid, session_created_at timestamptz,
                 dimension text, key text, n bigint)
LANGUAGE sql STABLE AS $$
    SELECT d.project_id, d.session_id,
           COALESCE((SELECT c.session_created_at FROM discrepancy_session_counts c
                      WHERE c.project_id = d.project_id AND c.session_id = d.session_id LIMIT 1),
                    (SELECT s.created_at FROM sessions s
                      WHERE s.project_id = d.project_id AND s.id = d.session_id)),
           d.dimension, d.key, d.n
    FROM (SELECT u.project_id, u.session_id, u.dimension, u.key, sum(u.n)::bigint AS n
          FROM unnest(p_project, p_session, p_dimension, p_key, p_n)
               AS u(project_id, session_id, dimension, key, n)
          GROUP BY 1, 2, 3, 4) d
    WHERE d.n <> 0
$$;

-- Applies the deltas. A negative delta only ever updates a row that exists
-- (the cascade of a project's deletion may have removed it already: then
-- there is nothing to take out). Rows taken to 0 leave the session table.
CREATE FUNCTION discrepancy_counts_apply(
    p_project uuid[], p_session uuid[], p_dimension text[], p_key text[], p_n bigint[]
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO discrepancy_session_counts AS c
        (project_id, session_id, session_created_at, dimension, key, n)
    SELECT d.project_id, d.session_id, d.session_created_at, d.dimension, d.key, d.n
    FROM discrepancy_count_delta(p_project, p_session, p_dimension, p_key, p_n) d
    WHERE d.session_created_at IS NOT NULL
      AND (d.n > 0 OR EXISTS (SELECT 1 FROM discrepancy_session_counts x
                               WHERE x.project_id = d.project_id AND x.session_id = d.session_id
                                 AND x.dimension = d.dimension AND x.key = d.key))
    ORDER BY 1, 2, 4, 5
    ON CONFLICT (project_id, session_id, dimension, key) DO UPDATE SET n = c.n + EXCLUDED.n;

    INSERT INTO discrepancy_day_counts AS c (project_id, day, dimension, key, n)
    SELECT g.project_id, g.day, g.dimension, g.key, g.n
    FROM (SELECT d.project_id, date_trunc('day', d.session_created_at, 'UTC') AS day,
                 d.dimension, d.key, sum(d.n)::bigint AS n
          FROM discrepancy_count_delta(p_project, p_session, p_dimension, p_key, p_n) d
          WHERE d.session_created_at IS NOT NULL
          GROUP BY 1, 2, 3, 4) g
    WHERE g.n <> 0
      AND (g.n > 0 OR EXISTS (SELECT 1 FROM discrepancy_day_counts x
                               WHERE x.project_id = g.project_id AND x.day = g.day
                                 AND x.dimension = g.dimension AND x.key = g.key))
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (project_id, day, dimension, key) DO UPDATE SET n = c.n + EXCLUDED.n;

    -- Rows this call brought to 0 (it holds their locks already).
    DELETE FROM discrepancy_session_counts c
    USING unnest(p_project, p_session, p_dimension, p_key) AS u(project_id, session_id, dimension, key)
    WHERE c.project_id = u.project_id AND c.session_id = u.session_id
      AND c.dimension = u.dimension AND c.key = u.key AND c.n = 0;
$$;

CREATE FUNCTION discrepancy_counts_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM discrepancy_counts_apply(array_agg(project_id), array_agg(session_id),
                                     array_agg(dimension), array_agg(key), array_agg(n))
    FROM (SELECT r.project_id, r.session_id, v.dimension, v.key, count(*)::bigint AS n
          FROM new_rows r
          CROSS JOIN LATERAL (VALUES ('severity', r.severity::text), ('kind', r.kind),
                                     ('resolution', r.resolution)) AS v(dimension, key)
          GROUP BY 1, 2, 3, 4) d
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION discrepancy_counts_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM discrepancy_counts_apply(array_agg(project_id), array_agg(session_id),
                                     array_agg(dimension), array_agg(key), array_agg(n))
    FROM (SELECT r.project_id, r.session_id, v.dimension, v.key, -count(*)::bigint AS n
          FROM old_rows r
          CROSS JOIN LATERAL (VALUES ('severity', r.severity::text), ('kind', r.kind),
                                     ('resolution', r.resolution)) AS v(dimension, key)
          GROUP BY 1, 2, 3, 4) d
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

-- Only rows whose severity, kind or resolution changed count (a changed
-- session_id or project_id moves the row between sessions: both sides count).
CREATE FUNCTION discrepancy_counts_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM discrepancy_counts_apply(array_agg(project_id), array_agg(session_id),
                                     array_agg(dimension), array_agg(key), array_agg(n))
    FROM (SELECT x.project_id, x.session_id, v.dimension, v.key, sum(x.sign)::bigint AS n
          FROM (SELECT o.project_id, o.session_id, o.severity, o.kind, o.resolution, -1 AS sign
                FROM old_rows o
                UNION ALL
                SELECT r.project_id, r.session_id, r.severity, r.kind, r.resolution, 1
                FROM new_rows r) x
          CROSS JOIN LATERAL (VALUES ('severity', x.severity::text), ('kind', x.kind),
                                     ('resolution', x.resolution)) AS v(dimension, key)
          GROUP BY 1, 2, 3, 4
          HAVING sum(x.sign) <> 0) d
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER discrepancy_counts_insert AFTER INSERT ON discrepancies
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION discrepancy_counts_inserted();
CREATE TRIGGER discrepancy_counts_delete AFTER DELETE ON discrepancies
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION discrepancy_counts_deleted();
CREATE TRIGGER discrepancy_counts_update AFTER UPDATE ON discrepancies
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION discrepancy_counts_updated();
