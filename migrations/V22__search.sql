-- Full-text search (the `query` filter of ListExecutions,
-- ListDiscrepancies, ListSessionLogs and ListTestCases): a stored generated
-- tsvector per table, built with the 'simple' configuration (lower-cased
-- words, no stemming and no stop words, so identifiers, error codes and
-- words of any language match as written), and a GIN index on it. The
-- two-argument to_tsvector is immutable, as a generated column requires.
-- Queries parse with websearch_to_tsquery('simple', ...), the same
-- configuration, so both sides split words alike.
--
-- The GIN indexes lead with the vector alone (no btree_gin extension);
-- every search statement still filters by project_id, and the planner
-- combines or chooses between this index and the list's own.
--
-- Adding a stored generated column rewrites each table once.

-- Execution error messages.
ALTER TABLE test_executions
    ADD COLUMN search_vector tsvector
    GENERATED ALWAYS AS (to_tsvector('simple', error_message)) STORED;
CREATE INDEX test_executions_search_idx ON test_executions USING gin (search_vector);

-- Discrepancy descriptions.
ALTER TABLE discrepancies
    ADD COLUMN search_vector tsvector
    GENERATED ALWAYS AS (to_tsvector('simple', description)) STORED;
CREATE INDEX discrepancies_search_idx ON discrepancies USING gin (search_vector);

-- Session log messages.
ALTER TABLE session_logs
    ADD COLUMN search_vector tsvector
    GENERATED ALWAYS AS (to_tsvector('simple', message)) STORED;
CREATE INDEX session_logs_search_idx ON session_logs USING gin (search_vector);

-- Test-case names and descriptions (one vector over both).
ALTER TABLE test_cases
    ADD COLUMN search_vector tsvector
    GENERATED ALWAYS AS (to_tsvector('simple', name || ' ' || description)) STORED;
CREATE INDEX test_cases_search_idx ON test_cases USING gin (search_vector);
