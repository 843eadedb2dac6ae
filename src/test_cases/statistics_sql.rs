//! The statistics of executions, computed in SQL: totals by status,
//! duration percentiles and the flakiness ranking (window functions).

use super::ExecutionStatus;
use super::executions::StatisticsQuery;
use crate::db::Stmt;
use crate::error::Result;
use deadpool_postgres::GenericClient;
use uuid::Uuid;

/// Totals, pass rate inputs and duration percentiles of a scope.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub total: i64,
    pub by_status: Vec<(ExecutionStatus, i64)>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
}

/// The scope predicate of the statistics: `$project` the project (every
/// statistic covers one project), $1 test case, $2 subsystem, $3..$4 the
/// window on started_at.
macro_rules! stats_scope {
    ($project:literal) => {
        concat!(
            "FROM test_executions e \
             JOIN test_cases t ON t.project_id = e.project_id AND t.id = e.test_case_id \
             WHERE e.project_id = ",
            $project,
            " AND ($1::uuid IS NULL OR e.test_case_id = $1) \
               AND ($2::text IS NULL OR t.target_subsystem = $2) \
               AND ($3::timestamptz IS NULL OR e.started_at >= $3) \
               AND ($4::timestamptz IS NULL OR e.started_at < $4)"
        )
    };
}

const TOTALS: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    concat!(
        "SELECT count(*), \
                count(*) FILTER (WHERE e.status = 'passed'), \
                count(*) FILTER (WHERE e.status = 'failed'), \
                count(*) FILTER (WHERE e.status = 'skipped'), \
                count(*) FILTER (WHERE e.status = 'error'), \
                percentile_cont(0.5) WITHIN GROUP (ORDER BY e.duration_ms::float8) \
                    FILTER (WHERE e.status <> 'skipped'), \
                percentile_cont(0.95) WITHIN GROUP (ORDER BY e.duration_ms::float8) \
                    FILTER (WHERE e.status <> 'skipped') ",
        stats_scope!("$5")
    ),
);

/// Totals and duration percentiles of the executions of `project` in scope.
pub async fn totals(
    c: &impl GenericClient,
    project: Uuid,
    q: &StatisticsQuery,
    test_case_id: Option<Uuid>,
    subsystem: Option<&str>,
) -> Result<Totals> {
    let row = TOTALS
        .query_one(c, &[&test_case_id, &subsystem, &q.from, &q.to, &project])
        .await?;
    let by_status = [
        ExecutionStatus::Passed,
        ExecutionStatus::Failed,
        ExecutionStatus::Skipped,
        ExecutionStatus::Error,
    ]
    .into_iter()
    .enumerate()
    .map(|(i, s)| Ok((s, row.try_get::<_, i64>(i + 1)?)))
    .collect::<Result<_>>()?;
    Ok(Totals {
        total: row.try_get(0)?,
        by_status,
        p50_ms: row.try_get(5)?,
        p95_ms: row.try_get(6)?,
    })
}

/// One test case of the flakiness ranking.
#[derive(Debug, Clone, PartialEq)]
pub struct Flaky {
    pub test_case_id: Uuid,
    pub key: String,
    pub name: String,
    pub flips: i64,
    pub considered: i64,
}

// Per test case: its last $5 passed-or-failed executions (row_number over
// newest first), then lag() over them oldest first to count the changes
// between consecutive outcomes. Only the ranking leaves the database.
const FLAKY: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    concat!(
        "WITH scoped AS ( \
             SELECT e.test_case_id, e.status, e.started_at, e.id, \
                    row_number() OVER (PARTITION BY e.test_case_id \
                                       ORDER BY e.started_at DESC, e.id DESC) AS recency ",
        stats_scope!("$7"),
        "    AND e.status IN ('passed', 'failed')), \
         recent AS ( \
             SELECT test_case_id, status, \
                    lag(status) OVER (PARTITION BY test_case_id ORDER BY started_at, id) AS previous \
             FROM scoped WHERE recency <= $5), \
         counted AS ( \
             SELECT test_case_id, \
                    count(*) FILTER (WHERE previous IS NOT NULL AND previous <> status) AS flips, \
                    count(*) AS considered \
             FROM recent GROUP BY test_case_id) \
         SELECT c.test_case_id, t.key, t.name, c.flips, c.considered, count(*) OVER () AS flaky \
         FROM counted c JOIN test_cases t ON t.project_id = $7 AND t.id = c.test_case_id \
         WHERE c.flips > 0 \
         ORDER BY c.flips DESC, t.key LIMIT $6"
    ),
);

/// The flakiest test cases of `project` (most flips first, then by key)
/// and how many test cases in scope flipped at all.
pub async fn flakiest(
    c: &impl GenericClient,
    project: Uuid,
    q: &StatisticsQuery,
    test_case_id: Option<Uuid>,
    subsystem: Option<&str>,
) -> Result<(Vec<Flaky>, i64)> {
    let rows = FLAKY
        .query(
            c,
            &[
                &test_case_id,
                &subsystem,
                &q.from,
                &q.to,
                &q.flakiness_window,
                &q.top_flaky,
                &project,
            ],
        )
        .await?;
    let count = match rows.first() {
        Some(r) => r.try_get(5)?,
        None => 0,
    };
    let ranked = rows
        .iter()
        .map(|r| {
            Ok(Flaky {
                test_case_id: r.try_get(0)?,
                key: r.try_get(1)?,
                name: r.try_get(2)?,
                flips: r.try_get(3)?,
                considered: r.try_get(4)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok((ranked, count))
}
