-- Scale loader for executions (issue 18): test cases, test runs and
-- executions of one project, written straight with SQL, then the
-- statistics rollup (test_execution_days) rebuilt for that project.
--
--   psql "$DATABASE_URL" -v project=<project uuid> -v rows=1000000 \
--        -f bench/scale/executions.sql
--
-- Variables: project (required, an existing project's id), rows (required:
-- executions to add; S = 1000000, L = 5000000), days (default 90: they
-- start over the last `days` days), test_cases (default 2000, spread over
-- 20 subsystems and the six test types). Executions come in runs: one
-- execution of every test case per run, runs evenly spaced in time, so
-- rows / test_cases runs. Outcomes: 5 % of the test cases are flaky (25 %
-- of their executions fail), 2 % are broken (80 % fail), the rest fail
-- 1 % of the time; 2 % of executions are skipped and 0.5 % error.
-- Durations are log-normal around a per-test-case median (10 ms .. 10 s).
-- Loading again adds more executions (new runs) to the same test cases.
--
-- Lines starting with a backslash are psql commands (defaults); the rest
-- is plain SQL (tests/api/statistics_plans.rs runs it with the variables
-- replaced).
\set ON_ERROR_STOP on
\if :{?days}
\else
\set days 90
\endif
\if :{?test_cases}
\else
\set test_cases 2000
\endif

INSERT INTO test_cases (project_id, id, key, name, description, test_type, target_subsystem)
SELECT :'project'::uuid, md5(:'project' || '/tc/' || n)::uuid, 'scale-' || n,
       'scale test ' || n, 'loaded by bench/scale/executions.sql',
       (ARRAY['unit', 'integration', 'behavioral', 'performance', 'security', 'e2e'])[1 + n % 6],
       'subsystem-' || (n % 20)
FROM generate_series(0, :test_cases - 1) AS n
ON CONFLICT (project_id, key) DO NOTHING;

-- Runs after the ones already loaded (so loading twice adds history).
CREATE TEMP TABLE scale_runs AS
SELECT r, md5(:'project' || '/run/' || (r + base.n))::uuid AS id,
       now() - make_interval(days => :days)
             + (r::float8 / greatest(:rows / :test_cases, 1)) * make_interval(days => :days)
         AS started_at
FROM generate_series(0, greatest(:rows / :test_cases, 1)) AS r,
     (SELECT count(*) AS n FROM test_runs
      WHERE project_id = :'project'::uuid AND client_key LIKE 'scale-run-%') base;

INSERT INTO test_runs (id, project_id, client_key, content_digest, name, branch, status,
                       started_at, finished_at)
SELECT id, :'project'::uuid, 'scale-run-' || id, '\x00'::bytea, 'scale', 'main', 'passed',
       started_at, started_at + interval '20 minutes'
FROM scale_runs;

INSERT INTO test_executions (project_id, id, test_case_id, status, started_at, duration_ms,
                             run_id, attempt)
SELECT :'project'::uuid, gen_random_uuid(), md5(:'project' || '/tc/' || tc)::uuid,
       CASE WHEN u < 0.02 THEN 'skipped'
            WHEN u < 0.025 THEN 'error'
            WHEN v < CASE WHEN tc % 100 < 5 THEN 0.25 WHEN tc % 100 < 7 THEN 0.8 ELSE 0.01 END
                THEN 'failed'
            ELSE 'passed' END,
       run.started_at + make_interval(secs => (tc % 1200)),
       greatest(0, round(exp(ln(10) + (tc % 7) * ln(10) / 2
                             + 0.4 * sqrt(-2 * ln(1 - w)) * cos(2 * pi() * u))))::bigint,
       run.id, 1
FROM (SELECT g, g % :test_cases AS tc, g / :test_cases AS r,
             random() AS u, random() AS v, random() AS w
      FROM generate_series(0, :rows - 1) AS g) x
JOIN scale_runs run ON run.r = x.r;

DROP TABLE scale_runs;

-- The rollup of the project, rebuilt from its rows (as migration V25's
-- backfill does for every project); skipped by psql on a schema older than
-- V25 (to time the gateway before it).
SELECT to_regclass('test_execution_days') IS NOT NULL AS has_rollup \gset
\if :has_rollup
DELETE FROM test_execution_days WHERE project_id = :'project'::uuid;
INSERT INTO test_execution_days (project_id, test_case_id, day, total, passed, failed,
                                 skipped, error, duration_ms, hist_buckets, hist_counts)
SELECT a.project_id, a.test_case_id, a.day, a.total, a.passed, a.failed, a.skipped, a.error,
       a.duration_ms, coalesce(h.buckets, '{}'), coalesce(h.counts, '{}')
FROM (SELECT project_id, test_case_id, (started_at AT TIME ZONE 'UTC')::date AS day,
             count(*) AS total,
             count(*) FILTER (WHERE status = 'passed') AS passed,
             count(*) FILTER (WHERE status = 'failed') AS failed,
             count(*) FILTER (WHERE status = 'skipped') AS skipped,
             count(*) FILTER (WHERE status = 'error') AS error,
             coalesce(sum(duration_ms) FILTER (WHERE status <> 'skipped'), 0)::bigint
                 AS duration_ms
      FROM test_executions WHERE project_id = :'project'::uuid GROUP BY 1, 2, 3) a
LEFT JOIN (SELECT project_id, test_case_id, day,
                  array_agg(bucket ORDER BY bucket) AS buckets,
                  array_agg(n ORDER BY bucket) AS counts
           FROM (SELECT project_id, test_case_id,
                        (started_at AT TIME ZONE 'UTC')::date AS day,
                        verdict_duration_bucket(duration_ms) AS bucket, count(*) AS n
                 FROM test_executions
                 WHERE project_id = :'project'::uuid AND status <> 'skipped'
                 GROUP BY 1, 2, 3, 4) b
           GROUP BY 1, 2, 3) h
  ON h.project_id = a.project_id AND h.test_case_id = a.test_case_id AND h.day = a.day;
-- From V35 on, a day row names its test case's subsystem and type (the
-- scope rollup, test_execution_scope_days, is kept by triggers from them).
SELECT to_regclass('test_execution_scope_days') IS NOT NULL AS has_scope_rollup \gset
\if :has_scope_rollup
UPDATE test_execution_days d
   SET target_subsystem = t.target_subsystem, test_type = t.test_type
  FROM test_cases t
 WHERE d.project_id = :'project'::uuid AND t.project_id = d.project_id AND t.id = d.test_case_id;
ANALYZE test_execution_scope_days;
-- The last 100 outcomes of every test case of the project (V35).
DELETE FROM test_case_recent_outcomes WHERE project_id = :'project'::uuid;
INSERT INTO test_case_recent_outcomes (project_id, test_case_id, outcomes, times)
SELECT t.project_id, t.id, r.outcomes, r.times
FROM test_cases t CROSS JOIN LATERAL verdict_recent_outcomes_of(t.project_id, t.id) r
WHERE t.project_id = :'project'::uuid;
ANALYZE test_case_recent_outcomes;
\endif
ANALYZE test_execution_days;
\endif

ANALYZE test_cases;
ANALYZE test_runs;
ANALYZE test_executions;
